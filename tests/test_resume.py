"""Preemption and resume: runs killed with SIGKILL (1 process) and SIGTERM (1 and 2 processes) end
bitwise where an uninterrupted run ends; damaged checkpoints, a diverging run and a failed write lose nothing."""
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cfdg_jax import checkpointing
from cfdg_jax import errors
from cfdg_jax import job as job_lib
from cfdg_jax import trainer
from test_pods import LAUNCHER, REPO, launch, one_device_mesh, restore, tiny_flags
from test_train import tiny_config

STEPS = 30  # Enough steps after each signal that a run cannot finish before the signal lands.


def train_flags(tmp_path, workdir):
  return [*tiny_flags(tmp_path, workdir, steps=STEPS), "--config.checkpoint_every=5"]


class Run:
  """A process whose output is collected line by line while it runs."""

  def __init__(self, command):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
    self.lines = []
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.process.stdout:
      self.lines.append(line)

  def wait_for_step(self, step, checkpoint=None, timeout=600):
    """Blocks until process 0 has logged the loss of `step` or later (and, if given, the
    checkpoint directory `checkpoint` exists: that step is committed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      logged = [int(s) for s in re.findall(r"^(?!\[\d+\] ).*\] \[(\d+)\] .*\bloss=",
                                           "".join(self.lines), re.M)]
      if logged and max(logged) >= step and (checkpoint is None or checkpoint.is_dir()):
        return
      assert self.process.poll() is None, "".join(self.lines)[-4000:]
      time.sleep(0.01)
    raise TimeoutError("".join(self.lines)[-4000:])

  def finish(self, timeout=600):
    self.process.wait(timeout)
    time.sleep(0.1)  # The reader thread drains the pipe.
    return self.process.returncode, "".join(self.lines)


def checkpoint_steps(workdir):
  return sorted(checkpointing.create_manager(str(workdir), read_only=True).all_steps())


def preempt(command, workdir, sig=signal.SIGTERM):
  """Runs `command` (a training run), sends it `sig` after step 16; returns the step it saved."""
  run = Run(command)
  run.wait_for_step(16)
  run.process.send_signal(sig)
  code, output = run.finish()
  assert code == 0, output[-4000:]
  preempted = int(re.search(r"Stopped on request \([^)]+\): the checkpoint of step (\d+) is "
                            r"committed", output)[1])
  assert 16 <= preempted < STEPS and preempted in checkpoint_steps(workdir)
  return preempted


def assert_bitwise_equal(workdir_a, workdir_b, step):
  """Parameters, EMA, optimizer state and step of two runs' checkpoints are identical."""
  a = jax.device_get(restore(workdir_a, step, one_device_mesh()))
  b = jax.device_get(restore(workdir_b, step, one_device_mesh()))
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_one_process_resumes_bitwise_after_sigkill_and_sigterm(tmp_path):
  train = [sys.executable, "-m", "cfdg_jax.train"]
  reference, workdir = tmp_path / "uninterrupted", tmp_path / "interrupted"
  code, output = Run([*train, *train_flags(tmp_path, reference)]).finish()
  assert code == 0, output[-4000:]

  run = Run([*train, *train_flags(tmp_path, workdir)])
  run.wait_for_step(8, checkpoint=workdir / "checkpoints" / "5")
  run.process.send_signal(signal.SIGKILL)  # Between checkpoints: after 5, before step 30's.
  code, output = run.finish()
  assert code == -signal.SIGKILL and max(checkpoint_steps(workdir)) < STEPS, output[-4000:]

  preempted = preempt([*train, *train_flags(tmp_path, workdir)], workdir)

  code, output = Run([*train, *train_flags(tmp_path, workdir)]).finish()
  assert code == 0 and f"Resuming from step {preempted}" in output, output[-4000:]
  assert_bitwise_equal(reference, workdir, STEPS)


@pytest.mark.slow
def test_two_processes_resume_bitwise_after_a_preemption(tmp_path):
  # (A lost host, SIGKILL to one process, is tests/test_pods.py's: the launcher stops the other.)
  launcher = [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=1", "--",
              "cfdg_jax.train"]
  reference, workdir = tmp_path / "uninterrupted", tmp_path / "interrupted"
  launch(2, 1, *train_flags(tmp_path, reference))

  # A closed terminal: SIGHUP to the launcher reaches both processes as SIGTERM, as a pod's
  # preemption notice does (launch/local.py treats SIGTERM, SIGHUP and Ctrl-C alike).
  preempted = preempt([*launcher, *train_flags(tmp_path, workdir)], workdir, signal.SIGHUP)

  output = launch(2, 1, *train_flags(tmp_path, workdir))
  assert f"Resuming from step {preempted}" in output
  assert_bitwise_equal(reference, workdir, STEPS)


@pytest.mark.slow
def test_a_second_run_on_a_held_workdir_is_refused_and_a_killed_runs_lease_taken_over(tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "cfdg_jax.train", *train_flags(tmp_path, workdir)]
  first = Run(command)
  first.wait_for_step(6, workdir / "checkpoints" / "5")
  env = dict(os.environ, PYTHONPATH=str(REPO))
  second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert second.returncode == 1, second.stderr[-3000:]
  assert re.fullmatch(
      rf"error: {workdir} is in use by another training run: pid {first.process.pid} on "
      rf"{re.escape(socket.gethostname())}, started [-\d: ]+\S+ \(its lease {workdir}/lease.json "
      r"is renewed every 15 s\)\. Stop it or wait for it to end, or use another --workdir\.",
      second.stderr.strip().splitlines()[-1]), second.stderr[-3000:]
  assert "Traceback" not in second.stderr and "Resuming" not in second.stderr

  first.process.kill()  # SIGKILL: its lease is left behind, and its pid is gone.
  first.finish()
  assert (workdir / "lease.json").exists()
  code, output = Run(command).finish()
  assert code == 0, output[-4000:]
  assert f"Taking over {workdir}/lease.json from a run that is gone (pid {first.process.pid}" in (
      output)
  assert "Resuming from step" in output
  assert not (workdir / "lease.json").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with the checkpoints of steps 3 and 6 of a tiny run (copy it before changing it)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = tmp_path_factory.mktemp("trained") / "run"
  trainer.train_and_evaluate(tiny_config(data_dir), str(workdir))
  return data_dir, workdir


def copy_of(trained, tmp_path):
  """(data_dir, a copy of the trained workdir to change)."""
  data_dir, source = trained
  shutil.copytree(source, tmp_path / "run")
  return data_dir, tmp_path / "run"


def snapshot(directory):
  """{path: (size, mtime)} of every file under `directory`."""
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_truncated_checkpoint_is_reported_set_aside_and_skipped(trained, tmp_path, info_log):
  data_dir, workdir = copy_of(trained, tmp_path)
  for f in (workdir / "checkpoints" / "6" / "train_state").glob("ocdbt.process_0/d/*"):
    os.truncate(f, f.stat().st_size // 2)  # The arrays' data files, as an interrupted copy.
  damaged = snapshot(workdir / "checkpoints" / "6")
  # What a save killed half-way leaves: never taken for a step, and no obstacle to saving it.
  half_written = workdir / "checkpoints" / "7.orbax-checkpoint-tmp"
  shutil.copytree(workdir / "checkpoints" / "3", half_written)
  os.truncate(next(half_written.rglob("manifest.ocdbt")), 10)

  state = trainer.train_and_evaluate(tiny_config(data_dir, num_train_steps=7), str(workdir))
  assert int(state.step) == 7
  log = info_log.text
  assert re.search(r"Skipping the checkpoint \S+/checkpoints/6: it cannot be read \(\S+/"
                   r"checkpoints/6/train_state/\S*: ", log), log
  assert "Resuming from step 3" in log
  # Moved, not deleted: the same files, byte for byte, under checkpoints_damaged/.
  [moved] = (workdir / "checkpoints_damaged").iterdir()
  assert moved.name.startswith("6.")
  assert [(os.path.relpath(p, moved), s) for p, (s, _) in snapshot(moved).items()] == [
      (os.path.relpath(p, workdir / "checkpoints" / "6"), s) for p, (s, _) in damaged.items()]
  assert checkpoint_steps(workdir) == [3, 6, 7]


def flip_a_bit(item_dir):
  """Flips one bit in the middle of the largest data file of a checkpoint item (size unchanged)."""
  data = max(item_dir.glob("ocdbt.process_0/d/*"), key=lambda f: f.stat().st_size)
  with open(data, "r+b") as f:
    f.seek(data.stat().st_size // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


def unverified_ema_params(workdir, step):
  """What Orbax restores from a step, without the checksums' verification."""
  manager = checkpointing.create_manager(str(workdir), read_only=True)
  job = job_lib.create_job(checkpointing.restore_config(manager, step), one_device_mesh())
  return jax.device_get(manager.restore(step, args=ocp.args.Composite(
      ema_params=ocp.args.StandardRestore(job.abstract_state.ema_params))).ema_params)


@pytest.mark.slow
def test_a_flipped_bit_fails_its_checksum_and_the_step_is_set_aside(trained, tmp_path, info_log):
  data_dir, workdir = copy_of(trained, tmp_path)
  clean = unverified_ema_params(workdir, 6)
  flip_a_bit(workdir / "checkpoints" / "6" / "ema_params")
  flipped = unverified_ema_params(workdir, 6)
  # The container is intact: Orbax restores the step, with one weight changed.
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(clean),
                                                      jax.tree.leaves(flipped))]
  assert sum(changed) == 1

  # Sampling names the damaged step, or takes the newest intact one.
  with pytest.raises(errors.JobError, match=r"^The checkpoint \S+/checkpoints/6 cannot be read "
                     r"\(Mismatch: 1 of \d+ arrays of checkpoints/6/ema_params differ from the "
                     r"checksums saved with them: \S+\); use another step \(available: \[3, 6\]"):
    checkpointing.load_ema_params(str(workdir), one_device_mesh(), step=6)
  _, step, _ = checkpointing.load_ema_params(str(workdir), one_device_mesh())
  assert step == 3

  # Training sets it aside and resumes from the step before.
  state = trainer.train_and_evaluate(tiny_config(data_dir, num_train_steps=7), str(workdir))
  assert int(state.step) == 7
  assert re.search(r"Skipping the checkpoint \S+/checkpoints/6: it cannot be read \(Mismatch: "
                   r"1 of \d+ arrays of checkpoints/6/ema_params differ", info_log.text)
  assert "Resuming from step 3" in info_log.text
  [moved] = (workdir / "checkpoints_damaged").iterdir()
  assert moved.name.startswith("6.")
  assert checkpoint_steps(workdir) == [3, 6, 7]


@pytest.mark.slow
def test_a_resume_that_changes_the_run_is_refused_and_other_changes_are_recorded(
    trained, tmp_path, info_log):
  data_dir, workdir = copy_of(trained, tmp_path)
  before = snapshot(workdir)
  # The learning rate does not change the batches or the noise: not in the table.
  changed = tiny_config(data_dir, num_train_steps=7, batch_size=8, seed=1,
                        **{"optimizer.learning_rate": 1e-3})
  with pytest.raises(errors.UserError) as refusal:
    trainer.train_and_evaluate(changed, str(workdir))
  assert re.fullmatch(
      rf"{workdir} was trained to step 6 with another config; these fields decide the batches, "
      r"the noise or the model, so resuming would silently make another run:\n"
      r"  field +checkpoint +this run\n"
      r"  config.batch_size +16 +8\n"
      r"  config.seed +0 +1\n"
      r"Resume with the checkpoint's values \(<workdir>/config.json\), use a new --workdir, or "
      r"pass --allow_config_change to resume with these changes\.", str(refusal.value))
  assert snapshot(workdir) == before  # Nothing written, config.json included.

  # Allowed: it resumes, and each change is logged and recorded with its step.
  assert int(trainer.train_and_evaluate(changed, str(workdir),
                                        allow_config_change=True).step) == 7
  assert "Resuming from step 6 with config.batch_size = 8 (the checkpoint's: 16)." in (
      info_log.text)
  rows = [json.loads(line) for line in (workdir / "config_changes.jsonl").read_text().splitlines()]
  assert [(r["step"], r["field"], r["checkpoint"], r["now"]) for r in rows] == [
      (6, "batch_size", 16, 8), (6, "num_train_steps", 6, 7),
      (6, "optimizer.learning_rate", tiny_config(data_dir).optimizer.learning_rate, 1e-3),
      (6, "seed", 0, 1)]


@pytest.mark.slow
def test_a_diverging_run_stops_without_saving_and_reruns_from_the_last_good_step(
    trained, tmp_path):
  data_dir, source = trained
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  before = snapshot(workdir / "checkpoints")
  # Step 7 takes a huge step; step 8's loss is not finite: the run stops before saving step 9.
  diverging = tiny_config(data_dir, num_train_steps=12, **{"optimizer.learning_rate": 1e30})
  with pytest.raises(errors.JobError, match=r"Step 8: the loss is .*training diverged\. "
                     r"Stopped without saving; the newest checkpoint \(step 6\) is intact"):
    trainer.train_and_evaluate(diverging, str(workdir))
  assert snapshot(workdir / "checkpoints") == before

  # Allowed to skip them, the run goes on; no non-finite value reaches its checkpoints.
  skipping = tiny_config(data_dir, num_train_steps=9, checkpoint_every=3, max_nonfinite_steps=3,
                         **{"optimizer.learning_rate": 1e30})
  state = trainer.train_and_evaluate(skipping, str(workdir))
  assert int(state.step) == 9
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


@pytest.mark.slow
def test_a_failed_write_is_reported_and_earlier_checkpoints_stay_intact(trained, tmp_path):
  data_dir, source = trained
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  before = snapshot(workdir / "checkpoints")

  flags = [*(f for f in tiny_flags(tmp_path, workdir, steps=9) if "data_dir" not in f),
           f"--config.data.data_dir={data_dir}", "--config.checkpoint_every=3",
           "--config.batch_size=16"]  # as `trained` was: a changed batch would be refused
  # Files may not grow beyond 200 kB: a bigger write fails (EFBIG), as on a full disk.
  small_disk = f"ulimit -f 200; trap '' XFSZ; exec {shlex.quote(sys.executable)} \"$@\""
  result = subprocess.run(["bash", "-c", small_disk, "bash", "-m", "cfdg_jax.train", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert result.returncode == 1, result.stderr[-4000:]
  last = result.stderr.strip().splitlines()[-1]
  assert re.fullmatch(
      r"error: Writing a checkpoint to \S+/checkpoints failed \(File too large "
      r"\[os_error_code='?27'?\]\); the checkpoints already there \(steps 3, 6\) are intact "
      r"and a rerun resumes from step 6\. Free disk space or fix the path, then rerun\.", last), last
  assert snapshot(workdir / "checkpoints") | before == snapshot(workdir / "checkpoints")
  assert checkpoint_steps(workdir) == [3, 6]


@pytest.mark.parametrize("overrides, row", [
    ({"data.num_classes": 12}, r"label_embed/embedding\s+\(11, 64\)\s+\(13, 64\)"),
    ({"data.channels": 3}, r"conv_in/kernel\s+\(3, 3, 1, 16\)\s+\(3, 3, 3, 16\)"),
    ({"model.base_channels": 32}, r"conv_in/bias\s+\(16,\)\s+\(32,\)(.|\n)*… and \d+ more"),
    ({"model.attn_resolutions": (8,)}, r"down1_attn0/norm/bias\s+\(32,\)\s+\(absent\)"),
    # The same parameters, but trained on other images: refused by the config field alone.
    ({"data.image_size": 16, "model.attn_resolutions": (8,)}, None)])
def test_a_checkpoint_of_another_model_is_refused_with_a_table(trained, overrides, row):
  data_dir, workdir = trained
  manager = checkpointing.create_manager(str(workdir), read_only=True)
  saved_config = checkpointing.restore_config(manager, 6)
  saved_shapes = checkpointing.param_shapes(manager, 6)
  job = job_lib.create_job(tiny_config(data_dir, **overrides), one_device_mesh())
  with pytest.raises(errors.UserError) as refused:
    checkpointing.check_compatible(saved_config, saved_shapes, job, str(workdir))
  message = str(refused.value)
  for field in overrides:
    assert re.search(rf"config\.{field} = \S.* there, \S.* here", message), message
  assert (re.search(row, message) if row else "parameter" not in message), message
  same = job_lib.create_job(tiny_config(data_dir), one_device_mesh())
  checkpointing.check_compatible(saved_config, saved_shapes, same, str(workdir))
