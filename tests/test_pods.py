"""Pods on this CPU: real processes (launch/local.py), other device counts and meshes, resharding
restores, and the launcher's failure handling."""
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cfdg_jax import checkpointing
from cfdg_jax import job as job_lib
from cfdg_jax import pipeline
from cfdg_jax import sharding
from cfdg_jax import watchdog

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = str(REPO / "launch" / "local.py")


def tiny_flags(tmp_path, workdir, steps=4):
  return [f"--workdir={workdir}", "--config", str(REPO / "configs" / "digits.py"),
          f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.num_train_steps={steps}",
          "--config.checkpoint_every=2", "--config.log_every=1", "--config.sample_every=1000",
          "--config.keep_checkpoints=5", "--config.batch_size=8",
          "--config.model.base_channels=16", "--config.model.num_res_blocks=1",
          "--config.model.head_channels=16", "--config.mesh.fsdp_min_size=256",
          "--config.sample.sampler.num_steps=3", "--config.sample.num_per_class=1"]


def launch(processes, devices, *flags, module="cfdg_jax.train", timeout=900):
  """Runs `module` under launch/local.py; returns its output (asserting success)."""
  result = subprocess.run([sys.executable, LAUNCHER, f"--num_processes={processes}",
                           f"--devices_per_process={devices}", "--", module, *flags],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-2000:])
  return result.stdout


def losses(output):
  """{step: loss} from process 0's metric lines."""
  return {int(step): float(loss) for step, loss in
          re.findall(r"^(?!\[\d+\] )\S+ .*\] \[(\d+)\] .*\bloss=([-\d.e+]+)", output, re.M)}


def one_device_mesh():
  return jax.make_mesh((1, 1), sharding.BATCH_AXES, devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def restore(workdir, step, mesh):
  """The TrainState of `workdir`'s checkpoint `step`, laid out for `mesh`."""
  manager = checkpointing.create_manager(str(workdir), read_only=True)
  config = checkpointing.restore_config(manager, step)
  return checkpointing.restore_train_state(manager, step,
                                           job_lib.create_job(config, mesh).abstract_state)


def assert_trees_close(a, b, **tolerance):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       **tolerance), a, b)


@pytest.mark.slow
def test_process_and_device_layouts_train_alike_and_checkpoints_reshard(tmp_path):
  # (One process of 4 devices, data-parallel alone, is the 2x2 layout's mesh on one process.)
  layouts = {"2x2": (2, 2, []), "1x1": (1, 1, []), "1x4 fsdp2": (1, 4, ["--config.mesh.fsdp=2"])}
  outputs = {}
  for name, (processes, devices, extra) in layouts.items():
    outputs[name] = launch(processes, devices, *tiny_flags(tmp_path, tmp_path / name), *extra)
  assert "mesh {'data': 4, 'fsdp': 1} over 2 processes" in outputs["2x2"]
  assert "mesh {'data': 2, 'fsdp': 2} over 1 processes" in outputs["1x4 fsdp2"]
  # Process 1 logs nothing below WARNING; only process 0 writes the sample grid.
  assert not re.search(r"^\[1\] .*steps/s", outputs["2x2"], re.M)
  assert (tmp_path / "2x2" / "samples_00000004.png").exists()

  # The same config, seed and global batch: the same losses and parameters, to float32 round-off.
  reference = losses(outputs["1x1"])
  assert sorted(reference) == [1, 2, 3, 4]
  mesh = sharding.create_mesh()
  final = {name: restore(tmp_path / name, 4, mesh) for name in layouts}
  for name in layouts:
    np.testing.assert_allclose([losses(outputs[name])[s] for s in range(1, 5)],
                               [reference[s] for s in range(1, 5)], rtol=2e-5, err_msg=name)
    assert_trees_close(final[name], final["1x1"], rtol=2e-4, atol=2e-6)

  # A checkpoint saved on 4 devices with fsdp = 2 restores bitwise onto 2 devices, 1 device, and
  # an fsdp mesh, each leaf laid out as that mesh's rule says.
  fsdp_mesh = sharding.create_mesh({"data": 1, "fsdp": -1})
  restored = [restore(tmp_path / "1x4 fsdp2", 2, m) for m in (mesh, one_device_mesh(), fsdp_mesh)]
  jax.tree.map(lambda *xs: [np.testing.assert_array_equal(np.asarray(x), np.asarray(xs[0]))
                            for x in xs[1:]], *restored)
  state = restored[2]
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.spec == sharding.param_spec(leaf.shape, fsdp_mesh, 256)
  per_device = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree)
                                for s in x.addressable_shards if s.device == jax.devices()[0])
  total = sum(x.nbytes for x in jax.tree.leaves(state))
  assert per_device(restored[0]) == total  # Replicated: every device holds all of it.
  assert per_device(state) < 0.6 * total  # Split in two, but for the small replicated arrays.

  # Resumed on 1 device from the step-2 checkpoint of 4 devices with fsdp = 2, training ends
  # where the uninterrupted 1-device run ended (the batches depend on the step alone).
  resumed = tmp_path / "resumed"
  shutil.copytree(tmp_path / "1x4 fsdp2" / "checkpoints" / "2", resumed / "checkpoints" / "2")
  output = launch(1, 1, *tiny_flags(tmp_path, resumed))
  assert "Resuming from step 2" in output
  np.testing.assert_allclose([losses(output)[s] for s in (3, 4)],
                             [reference[s] for s in (3, 4)], rtol=2e-5)
  assert_trees_close(restore(resumed, 4, mesh), final["1x1"], rtol=2e-4, atol=2e-6)

  # Sampling takes the checkpoint's mesh: its parameters split over fsdp = 2 here too.
  assert pipeline.load(str(tmp_path / "1x4 fsdp2")).mesh.shape == {"data": 1, "fsdp": 2}

  # The 2-process checkpoint samples on one device, and the same images on 2 processes × 2
  # devices with the parameters split in two (process 0 alone writing).
  pipe = pipeline.load(str(tmp_path / "2x2"), mesh=one_device_mesh())
  labels, w, ids = pipeline.class_sweep(10, 1, (0.0, 1.0))  # The sample CLI's grid.
  images = pipe.sample(labels, w, ids=ids, sampler="ddim", num_steps=3)
  assert pipe.step == 4 and images.shape == (20, 8, 8, 1)
  launch(2, 2, f"--workdir={tmp_path / '2x2'}", f"--npz={tmp_path / 'mp.npz'}", "--w=0,1",
         "--num_per_class=1", "--sampler=ddim", "--steps=3", "--fsdp=2", module="cfdg_jax.sample")
  with np.load(tmp_path / "mp.npz") as data:
    assert np.abs(data["images"].astype(int) - images).max() <= 1  # Float round-off, in uint8.


def test_misconfigured_mesh_fails_before_compiling(tmp_path):
  for extra, message in (
      (["--config.mesh.fsdp=3"], "needs a device count divisible by 3, but there are 4"),
      (["--config.mesh.data=2", "--config.mesh.fsdp=4"], "data=2 × fsdp=4 = 8 devices, but"),
      (["--config.batch_size=6"], r"config.batch_size=6 must be a positive multiple of the 4 "
                                  r"devices \(mesh data=4 × fsdp=1, 2 processes\)")):
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=2", "--",
         "cfdg_jax.train", *tiny_flags(tmp_path, tmp_path / "bad"), *extra],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=300)
    assert result.returncode != 0 and re.search(message, result.stdout), (extra, result.stdout)
    assert time.monotonic() - start < 120
    assert not (tmp_path / "bad" / "checkpoints").exists()


def training_launcher(workdir, *flags):
  """(launch/local.py running a 2-process training job that has started training, its pids)."""
  launcher = subprocess.Popen(
      [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=1", "--",
       "cfdg_jax.train", *tiny_flags(workdir.parent, workdir, steps=100000), *flags],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  first = launcher.stdout.readline()
  pids = [int(p) for p in re.search(r"pids \[([\d, ]+)\]", first).group(1).split(",")]
  for line in launcher.stdout:
    if re.search(r"steps_per_sec|steps/s", line):
      return launcher, pids
  pytest.fail("The job ended before it trained.")


def test_launcher_stops_every_process_when_one_fails(tmp_path):
  launcher, pids = training_launcher(tmp_path / "killed")
  os.kill(pids[1], signal.SIGKILL)
  start = time.monotonic()
  rest = launcher.communicate(timeout=60)[0]
  assert launcher.returncode != 0 and time.monotonic() - start < 30
  assert "process 1 exited with -9" in rest
  for pid in pids:  # Reaped by the launcher, so no pid of the job is left.
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


@pytest.mark.slow
def test_a_stopped_process_hangs_the_step_and_the_watchdog_ends_the_job(tmp_path):
  launcher, pids = training_launcher(tmp_path / "hung", "--hang_timeout=20")
  os.kill(pids[1], signal.SIGSTOP)  # Alive, but its peer waits for it in every collective.
  rest = launcher.communicate(timeout=300)[0]
  assert launcher.returncode == watchdog.EXIT_CODE, rest[-4000:]
  assert re.search(r"^\S+ .*\] No training step has completed for \d+ s \(timeout 20 s\): "
                   r"step \d+ was the last", rest, re.M), rest[-4000:]
  assert re.search(r"^(Thread|Current thread) 0x[0-9a-f]+ \(most recent call first\):\n"
                   r"  File ", rest, re.M), rest[-4000:]  # Process 0's Python stacks.
  assert f"process 0 exited with {watchdog.EXIT_CODE}" in rest
  for pid in pids:  # The stopped process too: killed and reaped by the launcher.
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_a_port_in_use_is_one_line(tmp_path):
  with socket.socket() as taken:
    taken.bind(("localhost", 0))
    port = taken.getsockname()[1]
    result = subprocess.run(
        [sys.executable, LAUNCHER, f"--port={port}", "--", "cfdg_jax.train",
         *tiny_flags(tmp_path, tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
        timeout=60)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].endswith(
      f"error: --port={port} is in use on localhost; give another, or leave --port out for a "
      "free one.")
  assert not (tmp_path / "run").exists()


def test_pod_and_slurm_scripts_dry_run(tmp_path):
  job = ["cfdg_jax.train", "--config", "configs/imagenet64.py", "--workdir", "gs://b/in64",
         "--config.sample.w=(0.0,1.0)", "--config.data.manual_dir=/data/it's here"]
  for script in ("tpu_vm_pod.sh", "gpu_slurm.sbatch"):
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / script)]).returncode == 0
  env = dict(os.environ, TPU_NAME="pod", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-32")
  tpu = subprocess.run(["bash", str(REPO / "launch" / "tpu_vm_pod.sh"), "--dry_run", "--", *job],
                       env=env, capture_output=True, text=True, check=True).stdout.splitlines()
  # First, here: does the job fit the slice? Its config and overrides, compiled for v4-32.
  assert shlex.split(tpu[1])[3:] == ["python3", "-m", "cfdg_jax.aot", "--topology", "v4-32",
                                     "--jobs", "train", *job[1:3], *job[5:]]
  gcloud = "gcloud compute tpus tpu-vm"
  assert tpu[3] == (f"{gcloud} create pod --zone us-central2-b --accelerator-type v4-32 "
                    "--version tpu-ubuntu2204-base")
  assert re.fullmatch(rf"{gcloud} scp \S+\.tar\.gz pod:cfdg_jax.tar\.gz --zone us-central2-b "
                      "--worker=all", tpu[5])
  assert "jax[tpu]==0.10.2" in tpu[7]
  skipped = subprocess.run(["bash", str(REPO / "launch" / "tpu_vm_pod.sh"), "--dry_run",
                            "--skip_check", "--", *job], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
  assert skipped[1].startswith(f"{gcloud} create pod")
  # The last command, as the workers' shell reads it, is the job with --distributed.
  ssh = shlex.split(tpu[-1])
  assert ssh[:9] == [*gcloud.split(), "ssh", "pod", "--zone", "us-central2-b", "--worker=all"]
  assert shlex.split(ssh[-1]) == ["cd", "cfdg_jax", "&&", "python3", "-m", *job, "--distributed"]
  slurm = subprocess.run(["bash", str(REPO / "launch" / "gpu_slurm.sbatch"), "--dry_run", "--",
                          *job], env=dict(os.environ, PER="node", SLURM_GPUS_ON_NODE="4"),
                         capture_output=True, text=True, check=True).stdout.splitlines()
  assert shlex.split(slurm[1]) == ["srun", "--kill-on-bad-exit=1", "python", "-m", *job,
                                   "--distributed", "--local_device_ids=0,1,2,3"]


@pytest.mark.parametrize("cores, env, expected", [
    (2, {}, 2), (1, {}, 1), (6, {}, 4), (64, {}, 8),
    (64, {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, None),
    (64, {"JAX_NUM_CPU_DEVICES": "1"}, None)])
def test_a_cpu_run_gets_one_device_per_core_unless_told(monkeypatch, cores, env, expected):
  from cfdg_jax import runtime  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cores)))
  assert runtime.cpu_devices() == expected
