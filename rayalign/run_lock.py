"""An exclusive lock on a run directory, so that two launches never write into one run at the same time.

The lock is the file `<run-dir>/run.lock`, created with O_CREAT | O_EXCL (atomic on local file systems and on
NFS v3 and later, which is what a run directory shared by a cluster's nodes relies on) and holding the
holder's pid, host and start time. A lock whose holder is gone is taken over only when that is certain: the
same host and no process with its pid. A lock held from another host is never broken automatically.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from rayalign.config import ConfigError

LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, announce=print):
    """Hold `<run_dir>/run.lock` for the block; ConfigError naming the holder when another run holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder and holder.get("host") == me["host"] and not _alive(int(holder.get("pid", 0))):
                path.unlink(missing_ok=True)
                announce(f"{path}: removed the stale lock of process {holder['pid']} (no longer running)")
                continue
            who = (f"process {holder['pid']} on {holder['host']} since {holder['since']}" if holder
                   else "a process that left an unreadable lock file")
            raise ConfigError(f"{run_dir}: in use by {who} ({path}); wait for that run to finish, or use another "
                              "--run-dir. If that process is gone (a crashed node), delete the lock file") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
