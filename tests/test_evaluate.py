"""The evaluation job: points, row identity, results log, plots, and digits runs end to end."""
import glob
import json
import logging as std_logging
import math
import os
import shutil
import subprocess
import sys
import threading

import jax
import ml_collections
import numpy as np
import pytest
from absl import logging as absl_logging
from PIL import Image

from cfdg_jax import guidance
from cfdg_jax import pipeline
from cfdg_jax import samplers
from cfdg_jax import sharding
from cfdg_jax import trainer
from cfdg_jax.eval import classifier
from cfdg_jax.eval import evaluator
from cfdg_jax.eval import networks
from cfdg_jax.eval import plan
from cfdg_jax.eval import plots
from cfdg_jax.eval import results
from test_train import REPO, count_compiles, tiny_config

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


# End to end on digits.

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, data_dir):
  out = str(tmp_path_factory.mktemp("classifier"))
  classifier.ensure_classifier(tiny_config(data_dir).data, out, num_steps=30, width=16)
  return out


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, data_dir, classifier_dir):
  """An evaluator started with --watch before training starts, and the run it scored.

  Returns (workdir, its eval config, the rows the watcher recorded, log messages). Training runs
  4 steps with a checkpoint every 2; a warm-up of 1 step lets 4 steps move the model enough that
  guidance changes the samples.
  """
  workdir = str(tmp_path_factory.mktemp("watched") / "run")  # Does not exist yet.
  config = tiny_config(data_dir, num_train_steps=4, checkpoint_every=2, sample_every=4,
                       **{"optimizer.warmup_steps": 1})
  config.eval.update(TINY_EVAL, classifier_dir=classifier_dir)
  result, messages = {}, []
  handler = std_logging.Handler()
  handler.emit = lambda record: messages.append(record.getMessage())
  std_logging.getLogger("absl").addHandler(handler)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)

  def watch():
    try:
      result["rows"] = evaluator.evaluate_workdir(workdir, config.eval, watch=True,
                                                  poll_seconds=0.2)
    except Exception as e:  # pylint: disable=broad-except  (re-raised in the test thread)
      result["error"] = e

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  try:
    trainer.train_and_evaluate(config, workdir)
    thread.join(timeout=300)
  finally:
    std_logging.getLogger("absl").removeHandler(handler)
    absl_logging.set_verbosity(verbosity)
  assert not thread.is_alive(), "The watcher did not exit after the final checkpoint."
  if "error" in result:
    raise result["error"]
  return workdir, config.eval, result["rows"], messages


def _read_rows(workdir):
  with open(os.path.join(workdir, "eval", "results.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_watch_scores_each_checkpoint_and_exits_after_the_final_one(watched_run):
  workdir, _, rows, messages = watched_run
  assert any("Waiting for checkpoints" in m for m in messages)  # The workdir did not exist.
  assert any("images/s" in m and "ETA" in m for m in messages)  # Sampling shows progress.
  assert sorted((r["step"], r["num_steps"], r["w"]) for r in rows) == sorted(
      (step, t, w) for step in (2, 4) for t, w in TINY_POINTS)
  assert rows == _read_rows(workdir)


@pytest.mark.slow
def test_rows_are_the_metrics_of_the_samplers_images(watched_run, classifier_dir):
  workdir, config, _, _ = watched_run
  rows = _read_rows(workdir)
  assert len(rows) == 6 and len({results.row_key(r) for r in rows}) == 6
  test_accuracy = classifier.make_classifier_fn(classifier_dir)[1]["test_accuracy"]
  digest = networks.classifier_digest(classifier_dir)
  for row in rows:
    assert row["metric_networks"] == {"classifier": digest}
    assert (row["labels"], row["num_samples"], row["seed"], row["guidance"]) == (
        "balanced", 20, 0, "cfg")
    assert row["sampler"] == f"ancestral(grid='cosine',num_steps={row['num_steps']},v=0.3)"
    assert row["nfe"] == row["num_steps"] and "fid" not in row
    # w = 0 points are sampled apart from the guided ones, with the conditional pass alone.
    assert row["examples_per_sample"] == pytest.approx(row["nfe"] * (1 if row["w"] == 0 else 2))
    assert 0.0 <= row["classifier_accuracy"] <= 1.0
    assert row["classifier_test_accuracy"] == test_accuracy
  # Each row measures exactly what the sampler gives for its point: recompute one from scratch.
  pipe = pipeline.load(workdir, 4)
  labels = np.arange(20) % 10
  net = networks.classifier_network(classifier_dir, pipe.config.data)
  reference = np.load(glob.glob(os.path.join(workdir, "eval", "reference_*.npz"))[0])
  images = {}
  for w in (0.0, 2.0):
    images[w] = pipe.sample(labels, w, sampler="ancestral(num_steps=4)", seed=config.seed)
    row = next(r for r in rows if (r["step"], r["num_steps"], r["w"]) == (4, 4, w))
    want = networks.compute_metrics(images[w], labels, [net], [reference], 3)
    for key in ("classifier_fid", "classifier_is", "classifier_accuracy"):
      assert row[key] == pytest.approx(want[key], rel=1e-5), key
  # Guidance changes the images (slightly, after 4 training steps; the sampler tests check how).
  assert (images[0.0] != images[2.0]).any()

  with Image.open(os.path.join(workdir, "eval", "tradeoff.png")) as image:
    assert image.size == (1200, 500)
  assert [f for f in os.listdir(os.path.join(workdir, "eval")) if f.startswith("events.out")]
  assert os.path.exists(os.path.join(workdir, "eval", "nfe.png"))  # NFE 3 and 4.


@pytest.mark.slow
def test_rerun_samples_nothing_and_recomputes_only_a_deleted_row(watched_run):
  workdir, config, _, _ = watched_run
  with count_compiles() as compiles:
    assert evaluator.evaluate_workdir(workdir, config) == []
  assert not compiles
  rows = _read_rows(workdir)
  lost = next(r for r in rows if (r["step"], r["num_steps"], r["w"]) == (4, 4, 2.0))
  path = os.path.join(workdir, "eval", "results.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows if r is not lost)

  redone = evaluator.evaluate_workdir(workdir, config)
  assert [results.row_key(r) for r in redone] == [results.row_key(lost)]
  # The same noise draws and the cached reference give the same numbers again.
  for k in ("classifier_fid", "classifier_is", "classifier_accuracy"):
    assert redone[0][k] == pytest.approx(lost[k], rel=1e-5), k
  assert sorted(map(results.row_key, _read_rows(workdir))) == sorted(map(results.row_key, rows))


@pytest.mark.slow
def test_other_samplers_guidance_labels_and_classifier_weights_get_their_own_rows(
    watched_run, tmp_path, data_dir):
  workdir, config, _, _ = watched_run
  before = _read_rows(workdir)
  new = evaluator.evaluate_workdir(
      workdir, config, step=4, sampler_specs=("dpmpp_2m(num_steps=3)", "heun(num_steps=2)"),
      guidance_specs=("cfg(interval_lo=-8.0,interval_hi=0.0)", "cfg(rescale=0.7)"))
  assert sorted((r["sampler"].split("(")[0], r["guidance"], r["w"]) for r in new) == sorted(
      (s, g, w) for s in ("dpmpp_2m", "heun")
      for g in ("cfg(interval_hi=0.0,interval_lo=-8.0)", "cfg(rescale=0.7)") for w in (0.0, 2.0))
  for r in new:
    if r["guidance"].startswith("cfg(interval") and r["w"] > 0:  # Only some steps guided.
      assert r["nfe"] < r["examples_per_sample"] < 2 * r["nfe"]
  assert {r["nfe"] for r in new} == {3}  # heun(num_steps=2): 3 evaluations.
  # Random labels (ADM's protocol) are another protocol: rows of their own.
  random_rows = evaluator.evaluate_workdir(workdir, eval_config(
      **{**config.to_dict(), "labels": "random", "step_sweep": ()}), step=4)
  assert len(random_rows) == 2 and all(r["labels"] == "random" for r in random_rows)
  # Retrained classifier weights in the same directory are another metric network: new rows.
  retrained = str(tmp_path / "classifier")
  shutil.copytree(config.classifier_dir, retrained)
  classifier.train(tiny_config(data_dir).data, retrained, num_steps=30, width=16, seed=1)
  moved = eval_config(**{**config.to_dict(), "classifier_dir": retrained, "step_sweep": ()})
  first = evaluator.evaluate_workdir(workdir, moved, step=4)
  assert len(first) == 2
  classifier.train(tiny_config(data_dir).data, retrained, num_steps=30, width=16, seed=2)
  second = evaluator.evaluate_workdir(workdir, moved, step=4)
  assert len(second) == 2
  assert {r["metric_networks"]["classifier"] for r in first + second} == {
      networks.classifier_digest(retrained), first[0]["metric_networks"]["classifier"]}
  assert first[0]["metric_networks"] != second[0]["metric_networks"]
  assert _read_rows(workdir)[:len(before)] == before  # Nothing recorded is lost.


@pytest.mark.slow
def test_step_scores_that_checkpoint_alone(watched_run):
  workdir, config, _, _ = watched_run
  rows = [r for r in _read_rows(workdir) if r["labels"] == "balanced"
          and r["sampler_family"].startswith("ancestral") and r["guidance"] == "cfg"
          and r["metric_networks"] == {"classifier": networks.classifier_digest(
              config.classifier_dir)}]
  path = os.path.join(workdir, "eval", "results.jsonl")
  everything = _read_rows(workdir)
  lost = [r for r in rows if (r["num_steps"], r["w"]) == (4, 2.0)]  # One row of steps 2 and 4.
  assert sorted(r["step"] for r in lost) == [2, 4]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in everything if r not in lost)
  redone = evaluator.evaluate_workdir(workdir, config, step=2)
  assert [results.row_key(r) for r in redone] == [results.row_key(lost[0])]
  # A step that is not there fails before anything compiles, with or without --watch (a later
  # checkpoint exists, or the step lies beyond the run's 4, so it will never come).
  with count_compiles() as compiles:
    with pytest.raises(ValueError, match=r"No checkpoint at step 3 .*available: \[2, 4\]\. Choose"):
      evaluator.evaluate_workdir(workdir, config, step=3)
    for step in (3, 6):
      with pytest.raises(ValueError, match=f"No checkpoint at step {step} .*beyond num_train"):
        evaluator.evaluate_workdir(workdir, config, step=step, watch=True, poll_seconds=0.1)
  assert not compiles
  evaluator.evaluate_workdir(workdir, config, step=4, watch=True, poll_seconds=0.1)
  assert len(_read_rows(workdir)) == len(everything)


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "cfdg_jax.evaluate", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line(watched_run, tmp_path):
  unknown = _run_cli("--workdir", str(tmp_path), "--config", "configs/digits.py",
                     "--config.eval.guidence=1")
  assert unknown.returncode == 1 and unknown.stderr.splitlines()[-1].startswith(
      "error: --config.eval.guidence: the config has no field 'eval.guidence'; did you mean "
      "--config.eval.guidance"), unknown.stderr[-2000:]
  bad_step = _run_cli("--workdir", str(tmp_path), "--step", "0")
  assert bad_step.returncode != 0 and "--step=0: checkpoint steps are positive" in bad_step.stderr
  no_sampler = _run_cli("--workdir", str(tmp_path), "--steps", "4")
  assert no_sampler.returncode != 0 and "need --sampler NAME" in no_sampler.stderr
  # The tiny sweep again, from the config file and flags: every row is there, nothing to do.
  workdir, config, _, _ = watched_run
  before = _read_rows(workdir)
  flags = [f"--config.eval.{k}={v}" for k, v in TINY_EVAL.items() if k != "samplers"]
  again = _run_cli("--workdir", workdir, "--config", "configs/digits.py", *flags,
                   "--sampler", "ancestral", "--steps", "4",
                   f"--config.eval.classifier_dir={config.classifier_dir}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert _read_rows(workdir) == before


@pytest.mark.slow
def test_two_processes_record_the_rows_of_one(watched_run, tmp_path):
  """The eval job as 2 processes × 1 device (launch/local.py): each row of the 1-process job
  on 2 devices, recorded once, by process 0."""
  workdir, config, rows, _ = watched_run
  copy = tmp_path / "run"
  shutil.copytree(os.path.join(workdir, "checkpoints"), copy / "checkpoints")
  flags = [f"--config.eval.{k}={v}" for k, v in TINY_EVAL.items() if k != "samplers"]
  result = subprocess.run(
      [sys.executable, str(REPO / "launch" / "local.py"), "--num_processes=2", "--",
       "cfdg_jax.evaluate", "--workdir", str(copy), "--config", "configs/digits.py", *flags,
       "--sampler", "ancestral", "--steps", "4", "--step=4",
       f"--config.eval.classifier_dir={config.classifier_dir}"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stdout[-4000:]
  expected = {results.row_key(r): r for r in rows if r["step"] == 4}
  recorded = _read_rows(copy)
  assert sorted(results.row_key(r) for r in recorded) == sorted(expected)
  for row in recorded:
    for metric in ("classifier_fid", "classifier_accuracy"):
      np.testing.assert_allclose(row[metric], expected[results.row_key(row)][metric], rtol=1e-4)
