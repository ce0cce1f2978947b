"""Runs one job as N processes on this machine's CPU, as a multi-host pod would run it.

  python launch/local.py --num_processes 2 --devices_per_process 2 -- \
      cfdg_jax.train --config configs/digits.py --workdir /tmp/cfdg_mp

Each process runs `python -m <module> <flags> --coordinator_address=localhost:PORT
--num_processes=N --process_id=i` with M CPU devices and gloo cross-process collectives, so the
job sees N×M devices, exactly the code paths of a pod (jax.distributed, per-process data,
collectives, checkpoints). Process 0's output is streamed as it is, the others' prefixed with
"[i] ". If any process fails, the others are stopped (SIGTERM, then SIGKILL) and the launcher
exits with the failing process's code. SIGTERM, SIGHUP (a closed terminal) or Ctrl-C to the
launcher is passed on to every process as SIGTERM, as a pod's preemption notice reaches every
host: training saves a checkpoint at a step the processes agree on and exits 0 (a second Ctrl-C,
or --grace_seconds, kills them). No process is left behind.
"""
import argparse
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time

_GRACE_SECONDS = 5.0  # Between SIGTERM and SIGKILL: a process stuck in a collective ignores TERM.
_signals = []  # Signals the launcher received (SIGTERM, SIGHUP, SIGINT), handled by run()'s loop.


def _record(signum, frame):
  del frame
  _signals.append(signum)


def port_is_free(port: int) -> bool:
  with socket.socket() as s:
    try:
      s.bind(("localhost", port))
    except OSError:
      return False
  return True


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process),
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONUNBUFFERED="1")
  # A forced host device count in XLA_FLAGS would override JAX_NUM_CPU_DEVICES.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                            env.get("XLA_FLAGS", "")).strip()
  return env


def _signal_all(processes: list[subprocess.Popen], sig: int) -> None:
  """Sends `sig` to each running process's whole group (its children too)."""
  for p in processes:
    if p.poll() is None:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass


def stop(processes: list[subprocess.Popen]) -> None:
  """TERM, then KILL after a grace period, every process still running."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    alive = [p for p in processes if p.poll() is None]
    _signal_all(alive, sig)
    deadline = time.monotonic() + _GRACE_SECONDS
    while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
      time.sleep(0.05)


def run(module: str, flags: list[str], num_processes: int, devices_per_process: int,
        port: int, grace_seconds: float = 300.0) -> int:
  """Starts the processes, streams their output; returns 0 or the first failure's exit code."""
  env = process_env(devices_per_process)
  processes = []
  for i in range(num_processes):
    command = [sys.executable, "-m", module, *flags, f"--coordinator_address=localhost:{port}",
               f"--num_processes={num_processes}", f"--process_id={i}"]
    # A session of its own, so that stop() reaches every process it starts.
    processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True))
  print(f"launch/local.py: {num_processes} processes × {devices_per_process} CPU devices, "
        f"coordinator localhost:{port}, pids {[p.pid for p in processes]}.", flush=True)
  selector = selectors.DefaultSelector()
  for i, p in enumerate(processes):
    os.set_blocking(p.stdout.fileno(), False)
    selector.register(p.stdout, selectors.EVENT_READ, i)
  pending = {i: b"" for i in range(num_processes)}
  status, deadline, forwarded = 0, None, 0
  try:
    while selector.get_map():
      if len(_signals) > forwarded:  # The first signal asks them to stop; a second insists.
        forwarded = len(_signals)
        if deadline is None:
          print(f"launch/local.py: signal {_signals[0]}; passing SIGTERM on to every process "
                f"(they get {grace_seconds:g} s to save and exit).", file=sys.stderr, flush=True)
          _signal_all(processes, signal.SIGTERM)
          deadline = time.monotonic() + grace_seconds
        else:
          deadline = time.monotonic()
      if deadline is not None and time.monotonic() >= deadline:
        status = 128 + signal.SIGTERM
        print("launch/local.py: killing the processes still running.", file=sys.stderr,
              flush=True)
        break
      for key, _ in selector.select(timeout=0.2):
        i = key.data
        chunk = key.fileobj.read()
        if not chunk:  # EOF: the process closed its output (it exits).
          selector.unregister(key.fileobj)
        *lines, pending[i] = (pending[i] + (chunk or b"")).split(b"\n")
        if not chunk and pending[i]:
          lines, pending[i] = [*lines, pending[i]], b""
        prefix = b"" if i == 0 else f"[{i}] ".encode()
        sys.stdout.buffer.write(b"".join(prefix + line + b"\n" for line in lines))
        sys.stdout.flush()
      failed = [(i, p.returncode) for i, p in enumerate(processes)
                if p.poll() is not None and p.returncode != 0]
      if failed:
        status = failed[0][1] if failed[0][1] > 0 else 128 - failed[0][1]
        print(f"launch/local.py: process {failed[0][0]} exited with {failed[0][1]}; stopping "
              "the others.", file=sys.stderr, flush=True)
        break
  finally:
    stop(processes)
  codes = [p.wait() for p in processes]
  if not status and any(codes):  # A failure seen only as its output ended.
    i = next(i for i, c in enumerate(codes) if c)
    print(f"launch/local.py: process {i} exited with {codes[i]}.", file=sys.stderr, flush=True)
    status = codes[i] if codes[i] > 0 else 128 - codes[i]
  return status


def main() -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n", 1)[0],
      usage="%(prog)s [--num_processes N] [--devices_per_process M] [--port P] -- MODULE [FLAGS]")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port on localhost (default: a free one)")
  parser.add_argument("--grace_seconds", type=float, default=300.0,
                      help="after a SIGTERM or Ctrl-C, how long the processes get to save a "
                      "checkpoint and exit before they are killed")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="the module to run (e.g. cfdg_jax.train) and its flags")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the module to run after --, e.g. -- cfdg_jax.train --config ...")
  for name in ("num_processes", "devices_per_process"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)}: use a positive integer.")
  if args.port is not None and not port_is_free(args.port):
    parser.error(f"--port={args.port} is in use on localhost; give another, or leave --port out "
                 "for a free one.")
  # Ctrl-C, TERM and HUP reach the launcher alone (the processes have their own sessions).
  for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, _record)
  return run(command[0], command[1:], args.num_processes, args.devices_per_process,
             args.port or free_port(), args.grace_seconds)


if __name__ == "__main__":
  sys.exit(main())
