"""The evaluation job's parts: points, row identity, results log, metrics, plots, bad configs.

The job end to end on digits runs in test_evaluate_job.py."""
import collections
import json
import math

import jax
import ml_collections
import numpy as np
import pytest
from etils import epath
from PIL import Image

from cfdg_jax import guidance
from cfdg_jax import samplers
from cfdg_jax import sharding
from cfdg_jax.errors import UserError
from cfdg_jax.eval import evaluator
from cfdg_jax.eval import metrics
from cfdg_jax.eval import networks
from cfdg_jax.eval import plan
from cfdg_jax.eval import plots
from cfdg_jax.eval import results
from test_train import count_compiles, tiny_config

# The tiny sweep the end-to-end tests score: T = 4 at w = 0 and 2, plus T = 3 at w = 2.
TINY_EVAL = {"num_samples": 20, "w": (0.0, 2.0), "samplers": ("ancestral(num_steps=4)",),
             "step_sweep": (3,), "step_sweep_w": (2.0,), "batch_size": 64}
TINY_POINTS = {(4, 0.0), (4, 2.0), (3, 2.0)}


def eval_config(**overrides):
  config = tiny_config(None).eval
  config.update(TINY_EVAL)
  config.update(overrides)
  return config


def sample_config():
  return tiny_config(None).sample


# Pure functions.

def test_points_are_samplers_times_guidance_times_w_then_the_step_sweep_once_each():
  config = eval_config(w=(2.0, 0.0, 2.0), samplers=("ancestral(num_steps=128)", "dpmpp_2m"),
                       guidance=("cfg", "cfg(rescale=0.7)"), step_sweep=(32, 128),
                       step_sweep_w=(1.0, 2.0))
  points = plan.plan_points(config, sample_config())
  described = [(p.sampler.canonical, p.guidance.canonical, p.w) for p in points]
  ancestral = "ancestral(grid='cosine',num_steps=128,v=0.3)"
  dpmpp = "dpmpp_2m(grid='uniform',lower_order_final=True,num_steps=6)"  # tiny_config's 6 steps.
  assert described == [
      (ancestral, "cfg", 2.0), (ancestral, "cfg", 0.0),
      (ancestral, "cfg(rescale=0.7)", 2.0), (ancestral, "cfg(rescale=0.7)", 0.0),
      (dpmpp, "cfg", 2.0), (dpmpp, "cfg", 0.0),
      (dpmpp, "cfg(rescale=0.7)", 2.0), (dpmpp, "cfg(rescale=0.7)", 0.0),
      ("ancestral(grid='cosine',num_steps=32,v=0.3)", "cfg", 1.0),
      ("ancestral(grid='cosine',num_steps=32,v=0.3)", "cfg", 2.0),
      (ancestral, "cfg", 1.0)]  # (128, cfg, 2.0) is already there.
  # Sampled together: one sampler, what is compiled, the interval and whether w = 0.
  groups = plan.sampling_groups(points)
  assert [len(g) for g in groups] == [3, 2, 2, 2, 2]
  assert all(len({(p.sampler, p.w == 0) for p in g}) == 1 for g in groups)


def test_row_keys_tell_every_setting_apart():
  base = {"step": 4, "w": 2.0, "labels": "balanced", "num_samples": 20, "seed": 0,
          "metric_networks": {"classifier": "0123456789abcdef"}}
  sampler_specs = ["ancestral(num_steps=128)", "ancestral(num_steps=128,v=0.2)",
                   "ancestral(num_steps=64)", "ancestral(num_steps=128,grid='uniform')",
                   "ddim(num_steps=128)", "ddim(num_steps=128,eta=0.5)", "dpmpp_2m(num_steps=128)",
                   "dpmpp_2m(num_steps=128,lower_order_final=False)",
                   "dpmpp_2m(num_steps=128,logsnr_min=-10.0)", "heun(num_steps=128)"]
  guidance_specs = ["cfg", "cfg(rescale=0.7)", "cfg(interval_lo=-3.0)", "cfg(apg_eta=0.0)",
                    "cfg(clip_x=False)", "autoguidance(guide_step=2,guide_workdir='/a')"]
  keys = set()
  for s in sampler_specs:
    for g in guidance_specs:
      row = base | {"sampler": samplers.parse(s, sample_config().sampler).canonical,
                    "guidance": guidance.parse(g, sample_config().guidance).canonical}
      keys.add(results.row_key(row))
      # Through JSON (as results.jsonl stores it) the key is unchanged; metrics are not part of it.
      assert results.row_key(json.loads(json.dumps(row | {"fid": 9.0}))) == results.row_key(row)
  assert len(keys) == len(sampler_specs) * len(guidance_specs)
  row = base | {"sampler": "ancestral", "guidance": "cfg"}
  for field, other in (("step", 6), ("w", 1.0), ("labels", "random"), ("num_samples", 40),
                       ("seed", 1), ("metric_networks", {"classifier": "fedcba9876543210"}),
                       ("metric_networks", {"classifier": "0123456789abcdef", "inception": "1"})):
    assert results.row_key(row | {field: other}) != results.row_key(row), field


def test_results_log_appends_durably_and_skips_torn_and_old_rows(tmp_path):
  path = tmp_path / "results.jsonl"
  row = {"step": 2, "w": 0.0, "sampler": "ancestral", "guidance": "cfg", "labels": "balanced",
         "num_samples": 20, "seed": 0, "metric_networks": {"classifier": "ab"}}
  old = {"step": 2, "w": 0.0, "num_steps": 4, "v": 0.3, "num_samples": 20, "seed": 0}
  path.write_text(json.dumps(old) + "\n" + json.dumps(row) + "\n" + '{"step": 4, "w": 2.0, "sa')
  log = results.ResultsLog(path)
  assert log.rows == [row] and log.get(results.row_key(row)) == row
  second = row | {"step": 4}
  log.append(second)
  reread = results.ResultsLog(path)
  assert reread.rows == [row, second]
  assert json.loads(path.read_text().splitlines()[0]) == old  # Kept in the file.


class _FakePipeline:
  """sample_batches as Pipeline's, with "images" that show what they were sampled with."""
  mesh = sharding.create_mesh()

  def __init__(self):
    self.shapes, self.last_stats = [], {}

  def sample_batches(self, labels, options, ids, *, batch_size, **unused):
    del unused
    self.last_stats = {"examples": 0}
    for start in range(0, len(labels), batch_size):
      part = slice(start, start + batch_size)
      self.shapes.append(batch_size)
      self.last_stats["examples"] += 2 * batch_size
      pixels = np.stack([labels[part], ids[part], np.round(options.w[part] * 10),
                         np.round(options.rescale[part] * 10)], axis=-1)
      yield start, pixels.astype(np.uint8)[:, None, :, None]


def test_sample_points_lays_out_each_point_with_the_same_labels_and_noise_ids():
  sampler = samplers.parse("ancestral(num_steps=4)", sample_config().sampler)
  group = [plan.Point(sampler, guidance.Settings((("rescale", r),)) if r else guidance.Settings(),
                      w) for w, r in ((1.5, 0.0), (4.0, 0.0), (4.0, 0.5))]
  fake = _FakePipeline()
  labels = np.arange(25) % 10
  out = list(evaluator.sample_points(fake, group, labels, seed=0, batch_size=16))
  assert [p for p, *_ in out] == group
  for point, images, cost in out:
    rescale = dict(point.guidance.options).get("rescale", 0.0)
    np.testing.assert_array_equal(images[:, 0, :, 0], np.stack(
        [labels, np.arange(25), np.full(25, round(point.w * 10)), np.full(25, rescale * 10)], -1))
    assert cost["sample_seconds"] > 0
  # 5 calls of 16 (the last padded) evaluate 160 examples: each point is charged for its share
  # of each call, the padding going to the last call's images.
  costs = [cost["examples_per_sample"] for *_, cost in out]
  assert costs[0] == pytest.approx(2.0) and sum(costs) * 25 == pytest.approx(160)
  assert fake.shapes == [16] * math.ceil(75 / 16)  # One batch shape: the sampler compiles once.


def test_compute_metrics_per_network():
  rng = np.random.default_rng(0)
  images, labels = rng.integers(0, 256, (30, 4, 4, 1), np.uint8), np.arange(30) % 3
  flat = images.reshape(30, -1).astype(np.float64)
  logits = np.eye(3)[labels] * 5.0  # A classifier that is always right.
  fake_inception = networks.Network("", lambda x: {"pool": x.reshape(len(x), -1) / 255.0}, "pool",
                                    False, "inception", "aa", {})
  fake_classifier = networks.Network("classifier_", lambda x: {"features": flat,
                                                               "logits": logits},
                                     "features", True, "classifier", "bb", {})
  references = [{"mu": flat.mean(0) / 255.0, "sigma": np.cov(flat / 255.0, rowvar=False),
                 "features": flat / 255.0},
                {"mu": flat.mean(0), "sigma": np.cov(flat, rowvar=False)}]
  row = networks.compute_metrics(images, labels, [fake_inception, fake_classifier], references,
                                 k=3)
  # Inception without logits: FID and precision/recall but no IS.
  assert set(row) == {"fid", "precision", "recall", "classifier_fid", "classifier_is",
                      "classifier_is_std", "classifier_accuracy"}
  assert row["fid"] == pytest.approx(0.0, abs=1e-6) and row["precision"] == row["recall"] == 1.0
  assert row["classifier_accuracy"] == 1.0 and row["classifier_is"] > 2.5
  wrong = networks.compute_metrics(images, (labels + 1) % 3, [fake_classifier], references[1:], 3)
  assert wrong["classifier_accuracy"] == 0.0


def test_compute_metrics_does_the_reference_work_once(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  net = networks.Network("", lambda x: {"pool": x.reshape(len(x), -1) / 255.0}, "pool", False,
                         "inception", "aa", {})
  path = epath.Path(tmp_path) / "reference_digits.npz"
  computed = networks.load_or_compute_reference(
      path, net, lambda: rng.integers(0, 256, (60, 4, 4, 1), np.uint8))
  loaded = networks.load_or_compute_reference(path, net, lambda: pytest.fail("not from the file"))
  points = [rng.integers(0, 256, (30, 4, 4, 1), np.uint8) for _ in range(2)]
  labels = np.arange(30) % 3
  # From a plain mapping, the reference's work is redone at every call.
  want = [networks.compute_metrics(images, labels, [net], [dict(loaded)], 3) for images in points]
  calls = collections.Counter()
  for name in ("_sqrt_eigh", "_knn_radii_sq"):
    def counted(*args, name=name, fn=getattr(metrics, name)):
      calls[name] += 1
      return fn(*args)
    monkeypatch.setattr(metrics, name, counted)
  for reference in (computed, loaded):
    calls.clear()
    assert [networks.compute_metrics(images, labels, [net], [reference], 3)
            for images in points] == want
    # The reference's covariance and k-NN radii once; each point's own at every point.
    assert calls == {"_sqrt_eigh": 1 + len(points), "_knn_radii_sq": 1 + len(points)}


def test_a_damaged_reference_cache_is_set_aside_and_computed_again(tmp_path, info_log,
                                                                   monkeypatch):
  net = networks.Network("", lambda x: {"pool": x.reshape(len(x), -1) / 255.0}, "pool", False,
                         "inception", "aa", {})
  images = np.random.default_rng(0).integers(0, 256, (20, 4, 4, 1), np.uint8)
  path = epath.Path(tmp_path) / "reference_digits.npz"
  want = networks.load_or_compute_reference(path, net, lambda: images)
  path.write_bytes(path.read_bytes()[:300])  # Truncated, as by a full disk.
  again = networks.load_or_compute_reference(path, net, lambda: images)
  np.testing.assert_array_equal(again["sigma"], want["sigma"])
  assert (tmp_path / "reference_digits.npz.damaged").stat().st_size == 300
  assert f"The reference statistics {path} cannot be read" in info_log.text
  path.write_bytes(b"not a zip")

  def read_only(self, target):  # A shared, read-only cache (root may write anywhere).
    raise PermissionError(13, "Permission denied", str(self))
  monkeypatch.setattr(type(path), "rename", read_only)
  with pytest.raises(UserError, match=rf"{path} cannot be read .* nor moved aside .*: delete "
                     "the file, or set config.eval.reference_cache"):
    networks.load_or_compute_reference(path, net, lambda: images)


def test_metric_networks_that_cannot_be_loaded_name_their_field(tmp_path):
  foreign = tmp_path / "inception.msgpack"
  foreign.write_bytes(np.random.default_rng(0).bytes(4000))
  with pytest.raises(UserError, match=rf"^config.eval.inception_weights='{foreign}': {foreign} "
                     "is not a msgpack weights file"):
    networks.checked("inception_weights", str(foreign),
                     lambda: networks.inception_network(str(foreign)))
  missing = tmp_path / "no_classifier"
  with pytest.raises(UserError, match=rf"^config.eval.classifier_dir='{missing}': No such file or "
                     rf"directory \({missing}/classifier.msgpack\). Fix the path, or train one"):
    networks.checked("classifier_dir", str(missing),
                     lambda: networks.classifier_digest(str(missing)))


def test_plots(tmp_path):
  rows = [{"step": step, "w": w, "fid": 10 / (1 + step / 1000) + w, "is": 20 + 5 * w,
           "classifier_accuracy": min(1.0, 0.8 + w / 10), "classifier_test_accuracy": 0.95}
          for step in (1000, 2000) for w in (0.0, 0.3, 1.0, 4.0)]
  path = tmp_path / "tradeoff.png"
  assert not plots.write_tradeoff_plot(path, [], title="none")
  assert not path.exists()
  assert plots.write_tradeoff_plot(path, rows, title="digits")
  with Image.open(path) as image:
    assert image.size == (1200, 500)
  nfe_rows = [{"step": 2, "w": w, "nfe": nfe, "sampler_family": family, "guidance": "cfg",
               "classifier_fid": 1 / nfe + w} for w in (0.0, 1.0) for nfe in (10, 20, 40)
              for family in ("ddim(eta=0.0,grid='cosine')", "dpmpp_2m(grid='uniform')")]
  path = tmp_path / "nfe.png"
  assert not plots.write_nfe_plot(path, nfe_rows[:1], title="one NFE")
  assert plots.write_nfe_plot(path, nfe_rows, title="digits")
  with Image.open(path) as image:
    assert image.size == (900, 450)


def test_bad_eval_configs_fail_before_compiling(tmp_path):
  n_dev = jax.device_count()  # 2 (tests/conftest.py): batch_size=3 is not a multiple.
  with count_compiles() as compiles:
    config = eval_config(classifier_dir="somewhere")
    config.guidence = ("cfg",)
    with pytest.raises(ValueError, match=r"Unknown config.eval field\(s\) \['guidence'\]"):
      plan.check_eval_config(config, n_dev)
    with pytest.raises(ValueError, match="predates the evaluator.*--config configs/digits.py"):
      plan.get_eval_config(ml_collections.ConfigDict({"data": {}}))
    partial = ml_collections.ConfigDict({"w": (1.0,)})
    with pytest.raises(ValueError, match="lacks.*pass the experiment's config file"):
      plan.check_eval_config(partial, n_dev)
    for overrides, message in (
        ({"classifier_dir": None}, "nothing to measure"),
        ({"num_samples": 5}, "num_samples=5"),
        ({"batch_size": 3}, f"batch_size=3 must be a .* of the {n_dev} devices"),
        ({"step_sweep": (0,)}, r"integers >= 1"),
        ({"labels": "uniform"}, r"labels='uniform'; use one of \('balanced', 'random'\)"),
        ({"samplers": ()}, r"config.eval.samplers is empty"),
        ({"samplers": ("ancestral", "dpm(num_steps=2)")},
         r"config.eval.samplers\[1\]='dpm\(num_steps=2\)': Unknown sampler 'dpm'"),
        ({"samplers": ("ddim(v=0.3)",)}, r"ddim has no field 'v'"),
        ({"guidance": ("cfg(rescale=2.0)",)}, r"config.eval.guidance\[0\].*rescale = \[2.0\]"),
        ({"step_sweep": (1,)}, r"config.eval.step_sweep.*ancestral needs an integer >= 2")):
      with pytest.raises(ValueError, match=message):
        plan.check_eval_config(eval_config(**{"classifier_dir": "c", **overrides}), n_dev)
    # The --config section is checked before any checkpoint is looked for.
    with pytest.raises(ValueError, match="nothing to measure"):
      evaluator.evaluate_workdir(str(tmp_path / "nowhere"), eval_config())
    with pytest.raises(FileNotFoundError, match="No checkpoints in .*pass --watch"):
      evaluator.evaluate_workdir(str(tmp_path / "nowhere"), eval_config(classifier_dir="c"))
  assert not compiles
