"""The multi-process code paths, run as two local CPU processes by launch/local_multiprocess.sh."""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_sample(tmp_path):
  workdir = tmp_path / "mp"
  env = dict(os.environ, PYTHON=sys.executable, WORKDIR=str(workdir), NUM_PROCESSES="2",
             PORT=str(20000 + os.getpid() % 20000), PYTHONPATH=str(REPO), XLA_FLAGS="")
  overrides = [f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.num_train_steps=4",
               "--config.checkpoint_every=2", "--config.sample_every=4", "--config.log_every=2",
               "--config.batch_size=8", "--config.model.base_channels=16",
               "--config.model.num_res_blocks=1", "--config.model.head_channels=16",
               "--config.sample.sampler.num_steps=3", "--config.sample.num_per_class=1"]
  result = subprocess.run(["bash", str(REPO / "launch" / "local_multiprocess.sh"), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  logs = {p.name: p.read_text() for p in (workdir / "logs").glob("*.log")}
  assert result.returncode == 0, (result.stderr[-2000:], {k: v[-3000:] for k, v in logs.items()})
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert (workdir / "samples_00000004.png").exists()
  # Process 0 logs progress; process 1 stays quiet below WARNING.
  assert "steps/s" in logs["process_0.log"] and "steps/s" not in logs["process_1.log"]
  assert "mesh {'data': 2} over 2 processes" in logs["process_0.log"]
