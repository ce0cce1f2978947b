"""The workdir's lease: one training run per workdir, a dead run's lease taken over."""
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from cfdg_jax import lease as lease_lib
from cfdg_jax.errors import UserError
from conftest import REPO


def write_lease(workdir, **fields):
  held = {"id": "other", "host": "tpu-vm-7", "pid": 4242, "started": "2026-12-07 09:00:00 UTC",
          "renewed": time.time(), **fields}
  (workdir / lease_lib.NAME).write_text(json.dumps(held))
  return held


def dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_the_holder_writes_renews_and_removes_its_lease(tmp_path):
  with lease_lib.Lease(str(tmp_path), renew_s=0.05) as lease:
    held = json.loads((tmp_path / lease_lib.NAME).read_text())
    assert held["id"] == lease.mine["id"] and held["pid"] == os.getpid()
    time.sleep(0.3)
    assert json.loads((tmp_path / lease_lib.NAME).read_text())["renewed"] > held["renewed"]
    assert not lease.lost
  assert sorted(os.listdir(tmp_path)) == []


def test_a_live_run_on_this_host_is_named_and_its_lease_kept(tmp_path):
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    held = write_lease(tmp_path, host=lease_lib.socket.gethostname(), pid=live.pid)
    with pytest.raises(UserError, match=rf"^{tmp_path} is in use by another training run: pid "
                       rf"{live.pid} on {held['host']}, started 2026-12-07 09:00:00 UTC \(its "
                       r"lease .*lease.json is renewed every 15 s\)\. Stop it or wait for it to "
                       r"end, or use another --workdir\.$"):
      lease_lib.Lease(str(tmp_path)).acquire()
  finally:
    live.kill()
  assert json.loads((tmp_path / lease_lib.NAME).read_text()) == held


def test_a_dead_run_on_this_host_is_taken_over_at_once(tmp_path, caplog):
  write_lease(tmp_path, host=lease_lib.socket.gethostname(), pid=dead_pid())
  tic = time.monotonic()
  with lease_lib.Lease(str(tmp_path)) as lease:
    assert json.loads((tmp_path / lease_lib.NAME).read_text())["id"] == lease.mine["id"]
  assert time.monotonic() - tic < 5
  assert "Taking over" in caplog.text


def test_a_pid_reused_by_another_process_does_not_hold_a_stale_lease(tmp_path):
  write_lease(tmp_path, host=lease_lib.socket.gethostname(), pid=os.getppid(),
              renewed=time.time() - 600)
  with lease_lib.Lease(str(tmp_path), stale_s=120) as lease:
    assert json.loads((tmp_path / lease_lib.NAME).read_text())["id"] == lease.mine["id"]


def test_another_host_is_watched_for_renewals(tmp_path):
  # Renewed long ago: gone at once.
  write_lease(tmp_path, renewed=time.time() - 3600)
  with lease_lib.Lease(str(tmp_path), stale_s=120):
    pass
  # Renewed just now, then never again: taken over once stale_s has passed.
  write_lease(tmp_path)
  tic = time.monotonic()
  with lease_lib.Lease(str(tmp_path), renew_s=0.2, stale_s=1.5):
    assert 1.0 < time.monotonic() - tic < 5
  # Renewed while watched: a live run, refused.
  held = write_lease(tmp_path)
  renewer = threading.Timer(0.5, write_lease, [tmp_path], {"renewed": time.time() + 1})
  renewer.start()
  with pytest.raises(UserError, match=r"in use by another training run: pid 4242 on tpu-vm-7"):
    lease_lib.Lease(str(tmp_path), renew_s=0.2, stale_s=30).acquire()
  renewer.join()
  assert json.loads((tmp_path / lease_lib.NAME).read_text())["id"] == held["id"]


def test_a_run_whose_lease_is_taken_over_knows_it(tmp_path, caplog):
  caplog.set_level(logging.ERROR)
  with lease_lib.Lease(str(tmp_path), renew_s=0.05) as lease:
    write_lease(tmp_path, id="usurper")
    time.sleep(0.3)
    assert lease.lost
  # Not removed: it is the other run's now.
  assert json.loads((tmp_path / lease_lib.NAME).read_text())["id"] == "usurper"
  assert "was taken over by another run (pid 4242 on tpu-vm-7)" in caplog.text


def test_of_runs_started_together_one_holds_the_workdir(tmp_path):
  # Six processes wait for one moment, then take the lease and, if they get it, keep it 3 s.
  start = time.time() + 3
  code = ("import sys, time; from cfdg_jax import lease, errors\n"
          f"time.sleep({start} - time.time())\n"
          "try:\n  lease.Lease(sys.argv[1]).acquire(); print('held'); time.sleep(3)\n"
          "except errors.UserError: print('refused')\n")
  runs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                           stdout=subprocess.PIPE, text=True) for _ in range(6)]
  outcomes = sorted(run.communicate(timeout=120)[0].strip() for run in runs)
  assert outcomes == ["held"] + ["refused"] * 5
  assert not list(tmp_path.glob("*.tmp"))


def test_a_lease_created_between_the_check_and_the_write_is_not_replaced(tmp_path):
  # Another run's lease appears after this run found none: creating it must fail, not replace it.
  held = write_lease(tmp_path, host=lease_lib.socket.gethostname(), pid=os.getppid())
  lease = lease_lib.Lease(str(tmp_path))
  real_read, first = lease._read, [True]  # pylint: disable=protected-access

  def read(*args):
    return first.pop() and None if first else real_read(*args)  # The first look: no lease.
  lease._read = read
  with pytest.raises(UserError, match=rf"pid {os.getppid()} on "):
    lease.acquire()
  assert json.loads((tmp_path / lease_lib.NAME).read_text()) == held
