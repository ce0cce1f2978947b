"""The evaluation job: sweep planning, row keys, results log, plot, and a digits run end to end."""
import json
import logging as std_logging
import math
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import logging as absl_logging
from PIL import Image

from cfdg_jax import sharding
from cfdg_jax import trainer
from cfdg_jax.eval import classifier
from cfdg_jax.eval import evaluator
from test_train import REPO, count_compiles, tiny_config

# The tiny sweep the end-to-end tests score: T=4 at w = 0 and 2, plus T=3 at w = 2.
TINY_EVAL = {"num_samples": 20, "guidance": (0.0, 2.0), "num_steps": 4, "step_sweep": (3,),
             "step_sweep_guidance": (2.0,), "batch_size": 64}
TINY_SETTINGS = {(4, 0.0), (4, 2.0), (3, 2.0)}


def eval_config(**overrides):
  config = tiny_config(None).eval
  config.update(TINY_EVAL)
  config.update(overrides)
  return config


# Pure functions.

def test_sampler_settings_take_the_union_once_main_steps_first():
  config = eval_config(guidance=(2.0, 0.0, 1.0, 0.0), num_steps=128, step_sweep=(256, 32, 128),
                       step_sweep_guidance=(1.0, 0.3))
  settings = evaluator.sampler_settings(config, default_v=0.3)
  assert settings == [evaluator.Setting(128, 0.3, (0.0, 0.3, 1.0, 2.0)),
                      evaluator.Setting(32, 0.3, (0.3, 1.0)),
                      evaluator.Setting(256, 0.3, (0.3, 1.0))]
  config.v, config.step_sweep = 0.2, ()
  assert evaluator.sampler_settings(config, default_v=0.3) == [
      evaluator.Setting(128, 0.2, (0.0, 1.0, 2.0))]


def test_row_keys():
  row = {"step": 4, "w": 2, "num_steps": 3, "v": 0.3, "num_samples": 20, "seed": 0, "fid": 1.5}
  assert evaluator.row_key(row) == (4, 2.0, 3, 0.3, 20, 0)
  # Through JSON (as results.jsonl stores it) the key is unchanged; the metrics are not part of it.
  assert evaluator.row_key(json.loads(json.dumps(row | {"fid": 9.0}))) == evaluator.row_key(row)
  for field, other in (("step", 6), ("w", 1.0), ("num_steps", 4), ("v", 0.2), ("num_samples", 40),
                       ("seed", 1)):
    assert evaluator.row_key(row | {field: other}) != evaluator.row_key(row), field
  config = eval_config()
  settings = evaluator.sampler_settings(config, default_v=0.3)
  keys = evaluator.planned_keys(7, settings, config)
  assert keys == [(7, 0.0, 4, 0.3, 20, 0), (7, 2.0, 4, 0.3, 20, 0), (7, 2.0, 3, 0.3, 20, 0)]


def test_results_log_appends_durably_and_skips_a_torn_line(tmp_path):
  path = tmp_path / "results.jsonl"
  row = {"step": 2, "w": 0.0, "num_steps": 4, "v": 0.3, "num_samples": 20, "seed": 0}
  path.write_text(json.dumps(row) + "\n" + '{"step": 4, "w": 2.0, "num_st')  # Crashed mid-write.
  log = evaluator.ResultsLog(path)
  assert log.rows == [row] and log.get(evaluator.row_key(row)) == row
  second = row | {"step": 4}
  log.append(second)
  reread = evaluator.ResultsLog(path)
  assert reread.rows == [row, second]
  assert reread.get(evaluator.row_key(second)) == second


def test_sample_sweep_lays_out_each_w_with_the_same_labels_and_noise_ids():
  mesh = sharding.create_mesh()
  shapes = []

  @jax.jit
  def encode(params, rng, labels, w, ids):  # "Images" that show what they were sampled with.
    del params, rng
    pixels = jnp.stack([labels, ids, jnp.round(w * 10).astype(jnp.int32)], axis=-1)
    return pixels.astype(jnp.uint8)[:, None, :, None]  # [B, 1, 3, 1]

  def sample_fn(*args):
    shapes.append(args[2].shape)
    return encode(*args)

  guidance = (0.0, 1.5, 4.0)
  out = list(evaluator.sample_sweep(sample_fn, None, jax.random.key(0), guidance, num_samples=25,
                                    num_classes=10, batch_size=16, mesh=mesh))
  assert [w for w, *_ in out] == list(guidance)
  for w, labels, images, seconds in out:
    np.testing.assert_array_equal(labels, np.arange(25) % 10)
    np.testing.assert_array_equal(images[:, 0, :, 0], np.stack(
        [np.arange(25) % 10, np.arange(25), np.full(25, round(w * 10))], axis=-1))
    assert seconds > 0
  # 75 images in 5 calls of one shape: the last is padded, so the sampler compiles once.
  assert shapes == [(16,)] * math.ceil(75 / 16)


def test_compute_metrics_per_network():
  rng = np.random.default_rng(0)
  images, labels = rng.integers(0, 256, (30, 4, 4, 1), np.uint8), np.arange(30) % 3
  flat = images.reshape(30, -1).astype(np.float64)
  logits = np.eye(3)[labels] * 5.0  # A classifier that is always right.
  fake_inception = evaluator.Network("", lambda x: {"pool": x.reshape(len(x), -1) / 255.0}, "pool",
                                     False, "fake", {})
  fake_classifier = evaluator.Network("classifier_", lambda x: {"features": flat, "logits": logits},
                                      "features", True, "fake", {})
  references = [{"mu": flat.mean(0) / 255.0, "sigma": np.cov(flat / 255.0, rowvar=False),
                 "features": flat / 255.0},
                {"mu": flat.mean(0), "sigma": np.cov(flat, rowvar=False)}]
  row = evaluator.compute_metrics(images, labels, [fake_inception, fake_classifier], references,
                                  k=3)
  # Inception without logits: FID and precision/recall but no IS.
  assert set(row) == {"fid", "precision", "recall", "classifier_fid", "classifier_is",
                      "classifier_is_std", "classifier_accuracy"}
  assert row["fid"] == pytest.approx(0.0, abs=1e-6) and row["precision"] == row["recall"] == 1.0
  assert row["classifier_accuracy"] == 1.0 and row["classifier_is"] > 2.5
  wrong = evaluator.compute_metrics(images, (labels + 1) % 3, [fake_classifier], references[1:], 3)
  assert wrong["classifier_accuracy"] == 0.0


def test_tradeoff_plot_draws_the_matching_rows(tmp_path):
  base = {"num_steps": 128, "v": 0.3, "num_samples": 100, "seed": 0}
  rows = [base | {"step": step, "w": w, "fid": 10 / (1 + step / 1000) + w, "is": 20 + 5 * w,
                  "classifier_accuracy": min(1.0, 0.8 + w / 10), "classifier_test_accuracy": 0.95}
          for step in (1000, 2000) for w in (0.0, 0.3, 1.0, 4.0)]
  rows.append(base | {"step": 3000, "w": 0.0, "classifier_fid": 1.0})  # Other metric settings.
  path = tmp_path / "tradeoff.png"
  assert not evaluator.write_tradeoff_plot(path, rows, dataset="digits", num_steps=64, v=0.3,
                                           num_samples=100, seed=0)
  assert not path.exists()
  assert evaluator.write_tradeoff_plot(path, rows, dataset="digits", num_steps=128, v=0.3,
                                       num_samples=100, seed=0)
  with Image.open(path) as image:
    assert image.size == (1200, 500)


def test_bad_eval_configs_fail_before_compiling(tmp_path):
  n_dev = jax.device_count()  # 2 (tests/conftest.py): batch_size=3 is not a multiple.
  with count_compiles() as compiles:
    config = eval_config(classifier_dir="somewhere")
    config.guidence = (1.0,)
    with pytest.raises(ValueError, match=r"Unknown config.eval field\(s\) \['guidence'\]"):
      evaluator.check_eval_config(config, n_dev)
    with pytest.raises(ValueError, match="predates the evaluator.*--config configs/digits.py"):
      evaluator.get_eval_config(ml_collections.ConfigDict({"data": {}}))
    partial = ml_collections.ConfigDict({"guidance": (1.0,)})
    with pytest.raises(ValueError, match="lacks.*pass the experiment's config file"):
      evaluator.check_eval_config(partial, n_dev)
    with pytest.raises(ValueError, match="nothing to measure"):
      evaluator.check_eval_config(eval_config(), n_dev)
    with pytest.raises(ValueError, match="num_samples=5"):
      evaluator.check_eval_config(eval_config(classifier_dir="c", num_samples=5), n_dev)
    with pytest.raises(ValueError, match=f"batch_size=3 must be a .* of the {n_dev} devices"):
      evaluator.check_eval_config(eval_config(classifier_dir="c", batch_size=3), n_dev)
    with pytest.raises(ValueError, match="integers >= 2"):
      evaluator.check_eval_config(eval_config(classifier_dir="c", step_sweep=(1,)), n_dev)
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
  assert sorted((r["step"], r["num_steps"], r["w"]) for r in rows) == sorted(
      (step, t, w) for step in (2, 4) for t, w in TINY_SETTINGS)
  assert rows == _read_rows(workdir)


@pytest.mark.slow
def test_rows_plot_and_tensorboard(watched_run, classifier_dir):
  workdir, _, _, _ = watched_run
  rows = _read_rows(workdir)
  assert len(rows) == 6 and len({evaluator.row_key(r) for r in rows}) == 6
  test_accuracy = classifier.make_classifier_fn(classifier_dir)[1]["test_accuracy"]
  for row in rows:
    assert {"dataset", "reference_split", "classifier_dir", "inception_weights", "classifier_fid",
            "classifier_is", "classifier_is_std", "classifier_accuracy", "classifier_test_accuracy",
            "sample_seconds", "metric_seconds", "wall_seconds", "time"} <= set(row)
    assert "fid" not in row and row["inception_weights"] is None  # No Inception weights given.
    assert (row["num_samples"], row["seed"], row["v"]) == (20, 0, 0.3)
    assert all(math.isfinite(row[k]) for k in ("classifier_fid", "classifier_is", "wall_seconds"))
    assert 0.0 <= row["classifier_accuracy"] <= 1.0
    assert row["classifier_test_accuracy"] == test_accuracy
  # Guidance changes the samples: w = 0 and w = 2 differ at the same checkpoint and T.
  at_t4 = {(r["step"], r["w"]): r["classifier_fid"] for r in rows if r["num_steps"] == 4}
  assert at_t4[(4, 0.0)] != at_t4[(4, 2.0)]

  with Image.open(os.path.join(workdir, "eval", "tradeoff.png")) as image:
    assert image.size == (1200, 500)
  assert [f for f in os.listdir(os.path.join(workdir, "eval")) if f.startswith("events.out")]
  assert [f for f in os.listdir(os.path.join(workdir, "eval")) if f.startswith("reference_")]


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
  assert [evaluator.row_key(r) for r in redone] == [evaluator.row_key(lost)]
  # The same noise draws and the cached reference give the same numbers again.
  for k in ("classifier_fid", "classifier_is", "classifier_accuracy"):
    assert redone[0][k] == pytest.approx(lost[k], rel=1e-5), k
  assert sorted(map(evaluator.row_key, _read_rows(workdir))) == sorted(map(evaluator.row_key, rows))


@pytest.mark.slow
def test_step_scores_that_checkpoint_alone(watched_run):
  workdir, config, _, _ = watched_run
  rows = _read_rows(workdir)
  path = os.path.join(workdir, "eval", "results.jsonl")
  lost = [r for r in rows if (r["num_steps"], r["w"]) == (4, 2.0)]  # One row of steps 2 and 4.
  assert sorted(r["step"] for r in lost) == [2, 4]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows if r not in lost)
  redone = evaluator.evaluate_workdir(workdir, config, step=2)
  assert [evaluator.row_key(r) for r in redone] == [evaluator.row_key(lost[0])]
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
  assert sorted(map(evaluator.row_key, _read_rows(workdir))) == sorted(map(evaluator.row_key, rows))


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "cfdg_jax.evaluate", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line(watched_run, tmp_path):
  unknown = _run_cli("--workdir", str(tmp_path), "--config", "configs/digits.py",
                     "--config.eval.guidence=1")
  assert unknown.returncode != 0 and 'Did you mean "guidance"' in unknown.stderr
  bad_step = _run_cli("--workdir", str(tmp_path), "--step", "0")
  assert bad_step.returncode != 0 and "--step=0: checkpoint steps are positive" in bad_step.stderr
  # The tiny sweep again, from the config file and flags: every row is there, nothing to do.
  workdir, config, _, _ = watched_run
  before = _read_rows(workdir)
  again = _run_cli("--workdir", workdir, "--config", "configs/digits.py",
                   *(f"--config.eval.{k}={v}" for k, v in TINY_EVAL.items()),
                   f"--config.eval.classifier_dir={config.classifier_dir}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert _read_rows(workdir) == before
