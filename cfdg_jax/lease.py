"""One training run per workdir: a lease file that the run's process 0 holds and renews.

<workdir>/lease.json holds {id, host, pid, started, renewed}. Advisory locks (flock, fcntl) are
unreliable on the file systems pods train on (NFS, GCS FUSE; gs:// has none), so the lease is a
file with a heartbeat instead: its holder rewrites it every `renew_s` seconds, and a lease that
nobody renews belongs to a dead run. A new run takes the workdir when there is no lease; when the
lease's process is dead (same host, checked at once); or when the lease is not renewed for
`stale_s` seconds (another host: the new run watches it that long, or less if it was renewed
longer ago). A live holder is named in one line. Creation is atomic on a local or NFS path (a
hard link, which fails if the name exists); on a cloud path the last writer wins and the other
sees so when it reads it back.
"""
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
from etils import epath

from cfdg_jax import errors

NAME = "lease.json"


class Lease:
  """`with Lease(workdir):` holds the workdir's lease (UserError when a live run holds it).

  `lost` becomes true when another run has taken the lease over (this run was thought dead):
  the holder must then stop without writing.
  """

  def __init__(self, workdir: str, *, renew_s: float = 15.0, stale_s: float = 120.0):
    self.path = epath.Path(workdir) / NAME
    self.renew_s, self.stale_s = renew_s, stale_s
    self.mine = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    self.lost = False
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, daemon=True, name="lease")

  def __enter__(self) -> "Lease":
    self.acquire()
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    if not self.lost and (self._read() or {}).get("id") == self.mine["id"]:
      self.path.unlink(missing_ok=True)

  def acquire(self) -> None:
    while True:
      held = self._read()
      if held is None:
        if self._create():
          return
        continue  # Another run created it first: look at it.
      if self._alive(held):
        raise errors.UserError(
            f"{self.path.parent} is in use by another training run: pid {held['pid']} on "
            f"{held['host']}, started {held['started']} (its lease {self.path} is renewed every "
            f"{self.renew_s:g} s). Stop it or wait for it to end, or use another --workdir.")
      logging.warning("Taking over %s from a run that is gone (pid %s on %s, started %s).",
                      self.path, held["pid"], held["host"], held["started"])
      if self._remove(held):
        if self._create():
          return

  def _alive(self, held: dict) -> bool:
    """Whether the run that wrote `held` is alive: its pid (same host) or its renewals."""
    if held["host"] == self.mine["host"]:
      try:
        os.kill(held["pid"], 0)
      except ProcessLookupError:
        return False
      except PermissionError:
        pass  # Another user's live process.
      return time.time() - held["renewed"] < self.stale_s  # Else the pid was reused.
    deadline = time.monotonic() + max(0.0, self.stale_s - max(0.0, time.time() - held["renewed"]))
    while time.monotonic() < deadline:  # Watch for a renewal (clocks of two hosts may differ).
      time.sleep(min(1.0, self.renew_s / 4))
      now = self._read()
      if now is None or now != held:
        return now is not None and now["id"] == held["id"]
    return False

  def _create(self) -> bool:
    text = json.dumps({**self.mine, "renewed": time.time()})
    if "://" in str(self.path):
      if self.path.exists():
        return False
      self.path.write_text(text)
      time.sleep(2.0)  # A run that wrote at the same time has written by now.
      return (self._read() or {}).get("id") == self.mine["id"]
    tmp = self.path.parent / f"{NAME}.{self.mine['id']}.tmp"
    tmp.write_text(text)
    try:
      os.link(tmp, self.path)  # Atomic, also on NFS: whole, or not at all if it exists.
      return True
    except FileExistsError:
      return False
    finally:
      tmp.unlink()

  def _remove(self, held: dict) -> bool:
    """Removes the stale lease `held`; False when another run changed it first."""
    aside = self.path.parent / f"{NAME}.{self.mine['id']}"
    try:
      self.path.rename(aside)  # Atomic: of two runs taking over, one renames it.
    except FileNotFoundError:
      return False
    taken = self._read(aside)
    aside.unlink(missing_ok=True)
    return taken is not None and taken["id"] == held["id"]

  def _read(self, path: epath.Path | None = None) -> dict | None:
    try:
      return json.loads((path or self.path).read_text())
    except FileNotFoundError:
      return None
    except (json.JSONDecodeError, KeyError):
      return None if path else {"id": None, "host": "?", "pid": -1, "started": "?",
                                "renewed": 0.0}  # Half-written: a dead run's.

  def _renew(self) -> None:
    while not self._stop.wait(self.renew_s):
      try:
        held = self._read()
        if held is None or held["id"] != self.mine["id"]:
          self.lost = True
          logging.error("This run's lease %s was taken over by another run (%s); stopping "
                        "without writing.", self.path, held and f"pid {held['pid']} on "
                        f"{held['host']}")
          return
        tmp = self.path.parent / f"{NAME}.{self.mine['id']}.tmp"
        tmp.write_text(json.dumps({**self.mine, "renewed": time.time()}))
        tmp.replace(self.path)  # Atomic: a reader never sees a half-written lease.
      except OSError as e:  # A file system hiccup: try again at the next renewal.
        logging.warning("Could not renew the lease %s (%s).", self.path, e)
