"""The benchmark scripts run and report what they promise (their figures are not judged here)."""
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_xla_host_devices_reports_each_count_and_ratios(tmp_path):
  out = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, str(REPO / "bench" / "xla_host_devices.py"), "--device_counts", "1,2",
       "--train_steps", "2", "--sample_batch", "4", "--sample_steps", "2", "--repeats", "1",
       "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert json.loads(result.stdout) == report
  assert [r["devices"] for r in report["results"]] == [1, 2]
  keys = ("train_steps_per_s", "sample_image_steps_per_s")
  for r in report["results"]:
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in keys)
  first, second = report["ratios_vs_first"]
  assert all(first[k] == 1.0 for k in keys)
  assert all(second[k] == pytest.approx(report["results"][1][k] / report["results"][0][k])
             for k in keys)


def test_xla_host_devices_rejects_counts_that_do_not_divide_the_batch():
  result = subprocess.run(
      [sys.executable, str(REPO / "bench" / "xla_host_devices.py"), "--device_counts", "1,3",
       "--sample_batch", "4"], capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "must be positive and divide" in result.stderr


def test_peak_reports_each_shape_and_the_best_of_each_kind(tmp_path):
  out = tmp_path / "peak.json"
  result = subprocess.run(
      [sys.executable, str(REPO / "bench" / "peak.py"), "--scale", "0.02", "--batch", "1",
       "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert json.loads(result.stdout) == report
  assert {"device", "platform", "local_devices"} <= report.keys()
  for kind in ("matmul", "conv3x3"):
    rows = [r for r in report["results"] if r["kind"] == kind]
    assert len(rows) == 3 and all(r["flops_per_s"] == pytest.approx(r["flops"] / r["median_s"])
                                  for r in rows)
    assert report["peak"][f"{kind}_float32"] == max(r["flops_per_s"] for r in rows)
  d = report["local_devices"]
  for r in report["results"]:  # 2 FLOPs per multiply-add, over every device's share.
    if r["kind"] == "matmul":
      rows, k, n = r["shape"]
      assert r["flops"] == 2 * rows * d * k * n
    else:
      b, h, w, c = r["shape"]
      assert r["flops"] == 2 * b * d * h * w * c * c * 9
  assert report["conv_vs_matmul"]["float32"] == pytest.approx(
      report["peak"]["conv3x3_float32"] / report["peak"]["matmul_float32"])


def run_digits_bench(tmp_path, script, *flags):
  """The JSON report of bench/`script` on a small digits model (also its last stdout line)."""
  out = tmp_path / f"{script}.json"
  result = subprocess.run(
      [sys.executable, str(REPO / "bench" / script), "--config",
       str(REPO / "configs" / "digits.py"), "--config.model.base_channels=16",
       "--config.model.head_channels=16", *flags, f"--out={out}"],
      cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert json.loads(result.stdout.strip().splitlines()[-1]) == report
  return report


@pytest.mark.slow
def test_train_bench_reports_every_key(tmp_path):
  report = run_digits_bench(tmp_path, "train.py", "--config.batch_size=8", "--steps=2",
                            "--warmup=1", "--peak_scale=0.02", "--peak_batch=1")
  for key in ("images_per_s", "compile_s", "flops_per_step", "achieved_flops", "mfu",
              "peak_memory_bytes", "params"):
    assert math.isfinite(report[key]) and report[key] > 0, key
  step = report["step_ms"]
  assert step["min"] <= step["median"] <= step["max"]
  assert report["images_per_s"] == pytest.approx(8 / (step["median"] / 1e3))
  assert report["achieved_flops"] == pytest.approx(
      report["flops_per_step"] * report["images_per_s"] / 8)
  assert report["mfu_peak"].startswith("bench/peak.py conv3x3_float32")
  assert (report["device"], report["dtype"], report["batch"]) == ("cpu", "float32", 8)


@pytest.mark.slow
def test_profile_groups_every_traced_op_by_kind_and_block(tmp_path):
  out = tmp_path / "profile.json"
  result = subprocess.run(
      [sys.executable, str(REPO / "bench" / "profile.py"), "--config",
       str(REPO / "configs" / "digits.py"), "--config.batch_size=8",
       "--config.model.base_channels=16", "--config.model.head_channels=16", "--steps=1",
       "--top=3", f"--trace_dir={tmp_path / 'trace'}", f"--out={out}"],
      cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert json.loads(result.stdout.strip().splitlines()[-1]) == report
  assert list((tmp_path / "trace").rglob("*.xplane.pb"))  # Kept for TensorBoard.
  total = report["op_seconds_per_step"]
  for group in ("kind", "block", "block_kind"):
    assert sum(v["seconds"] for v in report[group].values()) == pytest.approx(total)
    assert sum(v["share"] for v in report[group].values()) == pytest.approx(1.0)
  # A UNet step convolves, multiplies matrices (attention, embeddings) and all-reduces its
  # gradients over the 2 devices; attention and residual blocks are told apart.
  assert {"convolution", "dot", "collective"} <= report["kind"].keys()
  assert {"attention", "resblock", "other"} <= report["block"].keys()
  assert len(report["top"]) == 3 and report["top"][0]["seconds_per_step"] >= report["top"][1][
      "seconds_per_step"]


def test_profile_reads_kinds_and_blocks_from_hlo_text():
  sys.path.insert(0, str(REPO / "bench"))
  import profile as bench_profile  # pylint: disable=import-outside-toplevel
  hlo = """
%fused_computation.1 (p: f32[2,8]) -> f32[2] {
  %p = f32[2,8]{1,0} parameter(0)
  ROOT %reduce.1 = f32[2]{0} reduce(%p, %c), dimensions={1}, to_apply=%add
}
%fused_computation.2 (p: f32[8,2]) -> f32[2,8] {
  %p = f32[8,2]{1,0} parameter(0)
  ROOT %transpose.3 = f32[2,8]{1,0} transpose(%p), dimensions={1,0}
}
ENTRY %main.9 (a: f32[2,8]) -> f32[2] {
  %a = f32[2,8]{1,0} parameter(0)
  %conv.2 = f32[1,4,4,8]{3,2,1,0} convolution(%x, %w), window={size=3x3}, metadata={op_name="jit(f)/UNet/down0_res1/conv0/conv_general_dilated"}
  %conv.6 = f32[8,3,3,8]{3,2,1,0} convolution(%x, %y), window={size=4x4 pad=1_1x1_1}, dim_labels=f01b_i01o->01bf
  %dot.5 = f32[2,8]{1,0} dot(%a, %b), metadata={op_name="jit(f)/UNet/up1_attn0/qkv/dot_general"}
  %loop_fusion.7 = f32[2]{0} fusion(%a), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(f)/UNet/mid_res0/norm0/reduce_sum"}
  %copy_fusion.8 = f32[2,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation.2
  ROOT %all-reduce.4 = (f32[2]{0}, /*index=1*/f32[8]{0}) all-reduce(%loop_fusion.7, %p), to_apply=%add
}
"""
  ops = bench_profile.hlo_ops(hlo)
  assert {name: op[:2] for name, op in ops.items()} == {
      "p": ("other", "other"), "reduce.1": ("reduction", "other"),
      "transpose.3": ("copy", "other"), "a": ("other", "other"),
      "conv.2": ("convolution", "resblock"), "conv.6": ("convolution_weight_grad", "other"),
      "dot.5": ("dot", "attention"),
      "loop_fusion.7": ("reduction", "resblock"), "copy_fusion.8": ("copy", "other"),
      "all-reduce.4": ("collective", "other")}
  assert ops["dot.5"][2] == "jit(f)/UNet/up1_attn0/qkv/dot_general"


@pytest.mark.slow
def test_checkpoint_bench_reports_the_checksums_share(tmp_path):
  report = run_digits_bench(tmp_path, "checkpoint.py", "--repeats=1")
  for key in ("state_bytes", "checksum_first_call_s", "checksum_s", "save_s", "restore_s"):
    assert math.isfinite(report[key]) and report[key] > 0, key
  assert report["checksum_share_of_save"] == pytest.approx(report["checksum_s"] /
                                                           report["save_s"])
  # The checkpoints went to a directory that is removed.
  assert list(tmp_path.iterdir()) == [tmp_path / "checkpoint.py.json"]
