"""bench/eval.py times one evaluation point part by part and reports what it promises (its
figures are not judged here)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from test_evaluate_job import classifier_dir, data_dir  # noqa: F401  (fixtures: a tiny classifier)

NUM_SAMPLES = 32
SAMPLER = "ancestral(num_steps=2)"
POINT_KEYS = {"seconds", "fractions", "slowest", "images_per_s", "compile_s", "reference_seconds",
              "reference_images", "values", "feature_networks", "features_skipped", "w",
              "sampler", "sampler_family", "num_steps", "nfe", "guidance", "labels",
              "num_samples", "seed", "batch_size", "examples_per_sample", "device", "devices",
              "config", "workdir", "step"}


def _bench(tmp_path, *flags):
  """(return code, stdout, stderr) of bench/eval.py on digits at a tiny size."""
  result = subprocess.run(
      [sys.executable, str(REPO / "bench" / "eval.py"), "--config",
       str(REPO / "configs" / "digits.py"), "--config.model.base_channels=16",
       "--config.model.head_channels=16", "--config.model.num_res_blocks=1",
       f"--config.eval.samplers=('{SAMPLER}',)", f"--config.eval.num_samples={NUM_SAMPLES}",
       *flags], cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_LOG_COMPILES": "1"})  # Logs "Finished XLA compilation of".
  return result.returncode, result.stdout, result.stderr


def _report(tmp_path, *flags):
  out = tmp_path / "eval.json"
  code, stdout, stderr = _bench(tmp_path, f"--out={out}", *flags)
  assert code == 0, stderr[-3000:]
  report = json.loads(out.read_text())
  assert json.loads(stdout.strip().splitlines()[-1]) == report
  assert set(report) == POINT_KEYS
  assert (report["sampler"], report["nfe"], report["num_samples"]) == (
      "ancestral(grid='cosine',num_steps=2,v=0.3)", 2, NUM_SAMPLES)
  assert (report["device"], report["devices"], report["workdir"]) == ("cpu", 2, None)
  return report


def _check_parts(report, parts):
  """The point's parts: finite times that make up `total`, their fractions, the slowest."""
  seconds = report["seconds"]
  assert list(seconds) == parts + ["total"]
  assert all(math.isfinite(s) and s > 0 for s in seconds.values()), seconds
  assert seconds["total"] == pytest.approx(sum(seconds[p] for p in parts))
  assert report["fractions"] == pytest.approx({p: seconds[p] / seconds["total"] for p in parts})
  assert sum(report["fractions"].values()) == pytest.approx(1.0)
  assert report["slowest"] == max(parts, key=seconds.get)
  assert report["images_per_s"] == pytest.approx(
      {p: NUM_SAMPLES / seconds[p] for p in parts if p != "metrics"})
  compiled = [p for p in parts if p != "metrics"]
  assert list(report["compile_s"]) == compiled
  assert all(math.isfinite(s) and s > 0 for s in report["compile_s"].values())


@pytest.mark.slow
def test_eval_bench_times_sampling_features_metrics_and_the_reference(tmp_path, data_dir,
                                                                      classifier_dir):
  report = _report(tmp_path, f"--config.data.data_dir={data_dir}",
                   f"--classifier_dir={classifier_dir}", "--w=2")
  _check_parts(report, ["sample", "features_classifier", "metrics"])
  assert report["feature_networks"] == ["classifier"] and report["features_skipped"] is None
  assert math.isfinite(report["reference_seconds"]) and report["reference_seconds"] > 0
  assert report["reference_images"] == 1500  # Digits' train split, the reference split.
  values = report["values"]
  assert set(values) == {"classifier_fid", "classifier_is", "classifier_is_std",
                         "classifier_accuracy"}
  assert all(math.isfinite(v) for v in values.values()), values
  assert 0.0 <= values["classifier_accuracy"] <= 1.0
  # Guided (w = 2): both passes at each of the 2 steps.
  assert (report["w"], report["examples_per_sample"]) == (2.0, 4.0)


@pytest.mark.slow
def test_eval_bench_without_feature_networks_times_sampling_alone(tmp_path):
  report = _report(tmp_path, "--w=0")
  _check_parts(report, ["sample"])
  assert report["feature_networks"] == [] and report["values"] == {}
  assert "sampling alone" in report["features_skipped"]
  assert report["reference_seconds"] is None and report["reference_images"] is None
  assert (report["w"], report["examples_per_sample"]) == (0.0, 2.0)  # Unguided: one pass.


@pytest.mark.parametrize("flag, message", [
    ("--w=nan", "--w=nan must be a finite guidance strength"),
    ("--classifier_dir=/nowhere", "--classifier_dir=/nowhere holds no trained classifier .*"
     "cfdg_jax.eval.train_classifier")])
def test_eval_bench_rejects_bad_flags_before_compiling(tmp_path, flag, message):
  code, stdout, stderr = _bench(tmp_path, flag)
  assert code == 1 and not stdout
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and re.search(message, last), last
  assert "XLA compilation" not in stderr
