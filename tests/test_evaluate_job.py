"""The evaluation job end to end on digits: watching a training run, rows, reruns, the CLI, and
two processes."""
import glob
import json
import logging as std_logging
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from absl import logging as absl_logging
from PIL import Image

from cfdg_jax import pipeline
from cfdg_jax import trainer
from cfdg_jax.eval import classifier
from cfdg_jax.eval import evaluator
from cfdg_jax.eval import networks
from cfdg_jax.eval import results
from test_evaluate import TINY_EVAL, TINY_POINTS, eval_config
from test_train import REPO, count_compiles, tiny_config


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
  # Foreign bytes as Inception weights: one line naming the field, before anything is sampled.
  (tmp_path / "inception.msgpack").write_bytes(np.random.default_rng(0).bytes(4000))
  workdir, config, _, _ = watched_run
  foreign = _run_cli("--workdir", workdir, "--config", "configs/digits.py",
                     f"--config.eval.inception_weights={tmp_path / 'inception.msgpack'}")
  assert foreign.returncode == 1 and foreign.stderr.splitlines()[-1].startswith(
      f"error: config.eval.inception_weights='{tmp_path / 'inception.msgpack'}': "
      f"{tmp_path / 'inception.msgpack'} is not a msgpack weights file"), foreign.stderr[-3000:]
  assert "Sampling" not in foreign.stderr
  # The tiny sweep again, from the config file and flags: every row is there, nothing to do.
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
