"""bench/sample.py runs both modes of the real sampler and reports what it promises."""
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = str(REPO / "bench" / "sample.py")
TINY = ["--config", str(REPO / "configs" / "digits.py"), "--config.model.base_channels=16",
        "--config.model.head_channels=16", "--config.model.num_res_blocks=1"]
ROW_KEYS = {"dtype", "mode", "images_per_s", "call_ms", "compile_s", "nfe_per_image",
            "network_examples_per_image", "network_calls_per_step", "flops_per_image",
            "peak_memory_bytes", "peak_memory_source"}


@pytest.mark.slow
def test_sample_bench_reports_both_modes_of_each_dtype(tmp_path):
  out = tmp_path / "sample.json"
  # 4 steps, not 2: after 2, random weights clip nearly every pixel to 0 or 255, and
  # max_pixel_diff would miss a two_calls network that dropped its unconditional call.
  result = subprocess.run(
      [sys.executable, SCRIPT, *TINY, "--sampler=dpmpp_2m(num_steps=4)", "--batch=4", "--w=1",
       "--dtypes=float32,bfloat16", "--repeats=1", f"--out={out}"],
      cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert json.loads(result.stdout.strip().splitlines()[-1]) == report
  assert (report["platform"], report["devices"], report["batch"], report["w"]) == ("cpu", 2, 4, 1)
  assert report["sampler"].startswith("dpmpp_2m(") and "num_steps=4" in report["sampler"]
  assert report["config"].endswith("digits.py") and report["weights"] == "random"
  assert report.keys() == {"device", "devices", "platform", "batch", "w", "sampler", "config",
                           "weights", "results", "ratios", "max_pixel_diff"}
  rows = {(r["dtype"], r["mode"]): r for r in report["results"]}
  assert sorted(rows) == sorted((d, m) for d in ("float32", "bfloat16")
                                for m in ("one_call", "two_calls"))
  for (dtype, mode), r in rows.items():
    assert r.keys() == ROW_KEYS
    for key in ("images_per_s", "compile_s", "flops_per_image", "peak_memory_bytes"):
      assert math.isfinite(r[key]) and r[key] > 0, (dtype, mode, key)
    ms = r["call_ms"]
    assert 0 < ms["min"] <= ms["median"] <= ms["max"]
    assert r["images_per_s"] == pytest.approx(4 / (ms["median"] / 1e3))
    # dpmpp_2m: one evaluation per step; a guided evaluation is 2 examples per image either way.
    assert r["nfe_per_image"] == 4 and r["network_examples_per_image"] == 8
    assert r["network_calls_per_step"] == (2 if mode == "two_calls" else 1)
  for dtype in ("float32", "bfloat16"):
    assert report["ratios"][dtype] == pytest.approx(
        rows[dtype, "one_call"]["images_per_s"] / rows[dtype, "two_calls"]["images_per_s"])
    # The same function of the same rng: at most a rounding step apart.
    assert report["max_pixel_diff"][dtype] <= 1, dtype


@pytest.mark.parametrize("flag, message", [
    ("--batch=3", "--batch=3 is not a multiple of the 2 devices; use e.g. --batch=4."),
    ("--dtypes=float32,int8",
     "--dtypes=float32,int8: 'int8' is not a compute dtype; use some of float32,bfloat16,float16."),
])
def test_sample_bench_rejects_a_bad_flag_in_one_line(flag, message):
  result = subprocess.run([sys.executable, SCRIPT, *TINY, flag], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
  assert "Traceback" not in result.stderr
