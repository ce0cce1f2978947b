"""Ahead-of-time compilation for TPU slices: names and chips, the HLO reading, the programs the
jobs run, and `python -m cfdg_jax.aot` itself on v5e:2x2 (libtpu's compiler on this CPU)."""
import json
import os
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfdg_jax import costs
from cfdg_jax import fit
from cfdg_jax import job as job_lib
from cfdg_jax import pipeline
from cfdg_jax import programs
from cfdg_jax import samplers
from cfdg_jax import sharding
from cfdg_jax import topology
from cfdg_jax import trainer
from cfdg_jax.errors import UserError
from conftest import REPO
from test_train import tiny_config


@pytest.mark.parametrize("name, expected", [
    ("v5e:4x4", "v5e:4x4"), ("v5litepod-16", "v5e:4x4"), ("v5litepod-8", "v5e:2x4"),
    ("v5litepod-1", "v5e:1x1"), ("v6e-256", "v6e:16x16"), ("v4-8", "v4:2x2x1"),
    ("v4-32", "v4:2x2x4"), ("v4-128", "v4:4x4x4"), ("v5p-256", "v5p:4x4x8"),
    ("v4:2x2x2", "v4:2x2x2"), ("h100:8", "h100:1x8"), ("h100:2x8", "h100:2x8")])
def test_topology_names(name, expected):
  assert topology.canonical(name) == expected


@pytest.mark.parametrize("name", ["v4-33", "v9:2x2", "v5e:2x2x1", "v4:2x2", "tpu", "v5p-6"])
def test_bad_topology_names_say_what_is_valid(name):
  with pytest.raises(UserError, match=rf"--topology={name}: use GENERATION:SHAPE .* v5litepod-16"):
    topology.parse(name)


def test_out_of_memory_messages():
  assert topology.out_of_memory(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (25.81G) exceeds available HBM (15.75G).") == (round(25.81 * 2**30),
                                                                 round(15.75 * 2**30))
  assert topology.out_of_memory("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
                                "memory in memory space hbm. Used 20.50G of 15.48G hbm.") == (
                                    round(20.5 * 2**30), round(15.48 * 2**30))
  assert topology.out_of_memory("INVALID_ARGUMENT: something else (1G) available HBM (2G)") is None


# A TPU HLO module, abridged from a compiled fsdp train step: a reduce-scatter is a fusion that
# calls an "all-reduce-scatter" computation, whose all-reduce must not count again.
_HLO = """
%all-reduce-scatter.59 (input_0: bf16[3,3,256,256], input_1: bf16[512,512]) -> (bf16[3,3,128,256], bf16[256,512]) {
  %input_0 = bf16[3,3,256,256]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %input_1 = bf16[512,512]{1,0:T(8,128)(2,1)} parameter(1)
  %all-reduce.476 = (bf16[3,3,256,256]{3,2,1,0:T(8,128)(2,1)}, bf16[512,512]{1,0:T(8,128)(2,1)}) all-reduce(%input_0, %input_1), channel_id=1, replica_groups={{0,1},{2,3}}, use_global_device_ids=true, to_apply=%add.13.clone
  ROOT %tuple = (bf16[3,3,128,256], bf16[256,512]) tuple(%all-reduce.476)
}

%fused_computation.1 (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  ROOT %all-gather.9 = f32[32]{0} all-gather(%param_0), replica_groups=[1,4]<=[4], dimensions={0}
}

ENTRY %main.988_spmd (param.1: f32[256,512]) -> f32[512,512] {
  %param.1 = f32[256,512]{1,0:T(8,128)} parameter(0)
  %all-gather.239 = f32[512,512]{1,0:T(8,128)} all-gather(%param.1), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_0'}, dimensions={0}, use_global_device_ids=true
  %all-gather.340 = bf16[64,1,1,512]{3,0,2,1:T(8,128)(2,1)} all-gather(%gte.2775), channel_id=655, replica_groups=[2,2]<=[4], dimensions={0}, use_global_device_ids=true
  %fusion.3752 = (bf16[3,3,128,256]{3,2,1,0:T(8,128)(2,1)}, bf16[256,512]{1,0:T(8,128)(2,1)}) fusion(%a, %b), kind=kCustom, calls=%all-reduce-scatter.59
  %fusion.7 = f32[32]{0} fusion(%c), kind=kLoop, calls=%fused_computation.1
  %all-reduce.9 = f32[] all-reduce(%d), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  %all-to-all = f32[1,2,32,256]{3,2,0,1:T(8,128)} all-to-all(%bitcast.707), channel_id=350, replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=1] {'axis_1'}, dimensions={1}
  ROOT %collective-permute.1 = f32[512,512]{1,0} collective-permute(%all-gather.239), source_target_pairs={{0,1},{1,0}}
}
"""


def test_collectives_from_tpu_hlo():
  found = costs.collectives(_HLO)
  assert {k: v["count"] for k, v in found.items()} == {
      "all-gather": 2, "all-reduce": 1, "reduce-scatter": 1, "all-to-all": 1,
      "collective-permute": 1}
  gathered = 512 * 512 * 4 + 64 * 512 * 2
  assert found["all-gather"]["bytes"] == gathered
  assert found["all-gather"]["ring_bytes"] == gathered / 2  # Groups of 2: (n − 1)/n.
  scattered = (9 * 256 * 256 + 512 * 512) * 2  # The full buffers the fusion reduces.
  assert found["reduce-scatter"] == {"count": 1, "bytes": scattered, "ring_bytes": scattered / 2}
  assert found["all-reduce"] == {"count": 1, "bytes": 4.0, "ring_bytes": 4.0 * 2 * 3 / 4}
  assert found["all-to-all"]["bytes"] == 2 * 32 * 256 * 4
  assert found["collective-permute"]["ring_bytes"] == 512 * 512 * 4


def test_group_size_forms():
  assert costs.group_size("replica_groups={{0,1,2,3},{4,5,6,7}}") == 4
  assert costs.group_size("replica_groups=[4,8]<=[32]") == 8
  assert costs.group_size("replica_groups=mesh['x'=2,'y'=4,'z'=2] {'y','z'}") == 8
  assert costs.group_size("no groups") == 1


@pytest.mark.parametrize("spec", ["ancestral(num_steps=6)", "ddim(num_steps=5)",
                                  "dpmpp_2m(num_steps=5)", "heun(num_steps=4)"])
def test_counted_evaluations_are_the_network_calls_xla_counts(spec):
  """The estimate's premise: XLA's cost of a sampler is counted_evaluations guided calls."""
  config = tiny_config("/nonexistent")
  job = job_lib.create_job(config, sharding.create_mesh(config.mesh))
  settings = samplers.parse(spec, config.sample.sampler)
  config.sample.sampler = samplers.config_section(settings.name, settings.num_steps)
  program, = programs.sample_programs(config, jax.devices(), batch_size=8)
  size = config.data.image_size
  forward = jax.jit(lambda p, z, l, y: job.model.apply({"params": p}, z, l, y, train=False))
  network = _flops(forward.lower(job.abstract_state.ema_params,
                                 jax.ShapeDtypeStruct((16, size, size, 1), jnp.float32),
                                 jax.ShapeDtypeStruct((16,), jnp.float32),
                                 jax.ShapeDtypeStruct((16,), jnp.int32)))
  ratio = _flops(program.lower()) / network
  assert ratio == pytest.approx(fit.counted_evaluations(samplers.get(settings.name),
                                                        settings.num_steps), rel=0.01)


def _flops(lowered):
  cost = lowered.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_programs_take_the_arguments_the_jobs_pass():
  """The abstract arguments are the real ones': shapes, dtypes and shardings."""
  config = tiny_config("/nonexistent", **{"mesh.fsdp": 2, "mesh.fsdp_min_size": 256})
  step, grid = programs.train_programs(config, jax.devices())
  job = job_lib.create_job(config, sharding.create_mesh(config.mesh))
  state = job.init_state(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = sharding.shard_batch({
      "image": rng.uniform(-1, 1, (config.batch_size, 8, 8, 1)).astype(np.float32),
      "label": np.zeros(config.batch_size, np.int32)}, job.mesh)
  real = (state, batch, jax.device_put(jax.random.key(0), sharding.replicated(job.mesh)))
  _same_abstract(step.args, real)
  _, _, _, labels, options, ids = trainer.grid_sampler(job)
  padded = jax.tree.map(lambda a: sharding.global_array(a, job.mesh),
                        pipeline.padded_inputs(labels, options, ids, job.mesh.size))
  _same_abstract(grid.args, (state.ema_params, None, real[2], *padded))
  # Drawn config.sample.batch_size images a call, the grid's program takes one call's.
  config.sample.batch_size = 4
  _, chunked = programs.train_programs(config, jax.devices())
  assert chunked.args[3].shape == (4,) and chunked.work["images"] == 4
  assert grid.resident_bytes == programs.per_device_bytes(
      (job.abstract_state.params, job.abstract_state.opt_state, job.abstract_state.step))
  # Per-device FLOPs divide by the devices a program runs on: the Inception network's one.
  assert step.num_devices == grid.num_devices == jax.device_count() == 2
  assert programs.eval_programs(config, jax.devices())[-1].num_devices == 1


def test_jobs_for_a_tpu_are_built_for_the_tpu(libtpu):
  """The model of a job on TPU devices picks its attention for the TPU, not for this CPU."""
  config = tiny_config("/nonexistent")
  mesh = sharding.create_mesh(config.mesh, topology.devices("v5e:2x2"))
  assert job_lib.create_job(config, mesh).model.platform == "tpu"


@pytest.mark.parametrize("name", ["v6e:16x16", "v4:4x8x8"])
def test_a_pod_mesh_of_eight_chip_fsdp_groups_on_a_large_torus(libtpu, name):
  """fsdp = 8 on 16x16 chips splits a physical axis of 16, which jax.make_mesh refuses."""
  mesh = sharding.create_mesh({"data": -1, "fsdp": 8}, topology.devices(name))
  assert dict(mesh.shape) == {"data": 32, "fsdp": 8}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(256))
  for group in mesh.devices:  # Each fsdp group: 8 neighbouring chips along one axis.
    coords = np.array([d.coords for d in group])
    assert (coords != coords[0]).any(axis=0).sum() == 1


def _same_abstract(abstract, real):
  spec = lambda x: (x.shape, x.dtype, x.sharding.spec if hasattr(x.sharding, "spec") else None)
  assert jax.tree.map(spec, abstract) == jax.tree.map(spec, real)


def test_per_device_bytes_counts_shards():
  mesh = sharding.create_mesh({"data": 1, "fsdp": -1})
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  tree = {"a": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=split),
          "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16, sharding=sharding.replicated(mesh))}
  assert programs.per_device_bytes(tree) == 8 * 4 * 4 // 2 + 3 * 2


# The tool on a TPU slice: XLA's TPU compiler from libtpu.

def _aot(*flags, timeout=900):
  result = subprocess.run([sys.executable, "-m", "cfdg_jax.aot", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
  lines = result.stdout.strip().splitlines()
  report = next((json.loads(l) for l in reversed(lines) if l.startswith("{")), None)
  return result, report, lines[-1] if lines else ""


@pytest.mark.slow
def test_digits_on_v5e_2x2_every_job(libtpu):
  result, report, last = _aot("--topology=v5e:2x2", "--config", str(REPO / "configs/digits.py"),
                              "--config.mesh.fsdp=2", "--config.mesh.fsdp_min_size=4096",
                              "--fast")
  assert result.returncode == 0, result.stderr[-3000:]
  assert last.startswith("{") and report["fits"] and report["mesh"] == {"data": 2, "fsdp": 2}
  assert report["chips"] == 4 and report["device_kind"] == "TPU v5 lite"
  assert 15 * 2**30 < report["chip"]["usable_hbm_bytes"] < 16 * 2**30
  jobs = report["jobs"]
  assert set(jobs) == {"train", "sample", "eval"}
  assert set(jobs["eval"]["programs"]) == {"sampler ancestral(grid='cosine',v=0.3)", "inception"}
  step = jobs["train"]["programs"]["train_step"]
  assert step["fits"] and 0 < step["peak_bytes"] < 2**30 and step["alias_bytes"] > 0
  # fsdp = 2 splits the large kernels: the step gathers them and scatters their gradients.
  assert step["collectives"]["all-gather"]["count"] > 0
  assert step["collectives"]["reduce-scatter"]["count"] > 0
  assert step["estimate"]["images_per_s"] > 0 and jobs["train"]["estimate"]["days"] > 0
  grid = jobs["train"]["programs"]["grid"]
  assert grid["held_bytes"] > 0 and grid["peak_bytes"] == grid["total_bytes"] + grid["held_bytes"]
  # The sample job's default batch is the training grid: the same program, compiled once.
  assert jobs["sample"]["programs"]["sampler"]["total_bytes"] == grid["total_bytes"]


@pytest.mark.slow
def test_a_job_that_cannot_fit_says_so_and_suggest_finds_what_fits(libtpu):
  # 65,536 digits per chip: the activations of the train step alone exceed a v5e chip's HBM.
  result, report, last = _aot("--topology=v5e:2x2", "--config", str(REPO / "configs/digits.py"),
                              "--config.batch_size=262144", "--jobs=train", "--fast",
                              "--suggest")
  assert result.returncode == 1, result.stderr[-3000:]
  assert not report["fits"] and not report["jobs"]["train"]["fits"]
  assert last.startswith("does not fit: train needs ") and "GiB over the 15.75 GiB usable" in last
  suggestion = report["suggestion"]
  assert suggestion and suggestion["fits"], report
  assert "--config.model.remat=blocks" in suggestion["flags"] or (
      "--config.microbatches=" in suggestion["flags"])
  assert f"Suggested: {suggestion['flags']}" in last


@pytest.mark.slow
def test_cifar10_train_step_on_v5e_2x2_with_fsdp(libtpu):
  result, report, _ = _aot("--topology=v5e:2x2", "--config", str(REPO / "configs/cifar10.py"),
                           "--config.mesh.fsdp=2", "--jobs=train", "--fast")
  assert result.returncode == 0, result.stderr[-3000:]
  step = report["jobs"]["train"]["programs"]["train_step"]
  # The model's FLOPs: 12.4 GFLOP an image forward (its convolutions and matmuls), about 3×
  # that forward and backward, 128 images over 4 chips. (The compiler's own count, which
  # counts fsdp's looped convolutions once, can be half of it.)
  assert 3.5e12 < step["flops"] * 4 < 6e12, step["flops"]
  assert step["compiler_flops"] > 0
  # Parameters, EMA and Adam moments (16 bytes a parameter) are split in two.
  config = runpy.run_path(str(REPO / "configs/cifar10.py"))["get_config"]()
  shapes = jax.eval_shape(job_lib.create_job(config, sharding.create_mesh()).init_state,
                          jax.random.key(0))
  state_bytes = 16 * sum(x.size for x in jax.tree.leaves(shapes.params))
  assert 0.5 * state_bytes < step["argument_bytes"] < 0.6 * state_bytes


@pytest.mark.slow
def test_the_pod_launcher_stops_before_the_slice_when_the_job_does_not_fit(libtpu):
  env = dict(os.environ, TPU_NAME="pod", ZONE="us-central2-b", ACCELERATOR_TYPE="v5litepod-4",
             CHECK_FLAGS="--fast")
  result = subprocess.run(
      ["bash", str(REPO / "launch" / "tpu_vm_pod.sh"), "--", "cfdg_jax.train", "--config",
       "configs/digits.py", "--workdir", "gs://b/digits", "--config.batch_size=262144"],
      env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
  assert "does not fit: train needs" in result.stdout
  assert "not launched" in result.stderr and "gcloud" not in result.stdout


@pytest.mark.slow
def test_digits_for_8_h100s(cuda_plugin):
  # bfloat16: attention="auto" is then cuDNN's fused kernel, which needs cuDNN to compile.
  result, report, _ = _aot("--topology=h100:8", "--config", str(REPO / "configs/digits.py"),
                           "--config.model.dtype=bfloat16", "--jobs=train")
  assert result.returncode == 0, result.stderr[-3000:]
  assert report["device_kind"] == "NVIDIA H100 80GB HBM3" and report["chips"] == 8
  # JAX's pool: 75% of the 84.9 GB the device description gives.
  assert report["chip"]["usable_hbm_bytes"] == int(0.75 * 84942979072)
  step = report["jobs"]["train"]["programs"]["train_step"]
  assert step["fits"] and step["collectives"]["all-reduce"]["count"] >= 1
  # No cost analysis for a compile-only GPU: the FLOPs are counted on CPU, the time compute-bound.
  assert step["flops"] > 0 and step["estimate"]["hbm_s"] == 0
