"""An exclusive lock on a run directory, so that two launches never write into one run at the same time.

The lock is the file `<run-dir>/run.lock`, created with O_CREAT | O_EXCL (atomic on local file systems and on
NFS v3 and later, which is what a run directory shared by a cluster's nodes relies on) and holding the
holder's pid, host and start time. A lock whose holder is gone is taken over only when that is certain: the
same host and no process with its pid. A lock held from another host is never broken automatically.
"""

from __future__ import annotations

import contextlib
import fcntl
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
    """The lock's {pid, host, since}, or None when it cannot be read as one."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(holder, dict) and type(holder.get("pid")) is int and isinstance(holder.get("host"), str)):
        return None
    return {"pid": holder["pid"], "host": holder["host"], "since": str(holder.get("since", "?"))}


def _remove_if_unchanged(run_dir: Path, path: Path, seen: dict) -> bool:
    """Remove the lock if it still holds `seen` (a dead holder's), under an flock of the run directory: two launches
    that both found the stale lock must not remove each other's new one. Same-host takeovers only, so a local
    flock suffices."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _holder(path) != seen:
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, announce=print):
    """Hold `<run_dir>/run.lock` for the block; ConfigError naming the holder when another run holds it. A run
    directory made here and left empty (a launch refused) is removed with the lock."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    held = _holder(path)
    if held and (held["pid"], held["host"]) == (me["pid"], me["host"]):  # held by this process already (launch
        yield  # holds it from before plan.json is written, then the pipeline asks again): released by the outer hold
        return
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder and holder["host"] == me["host"] and not _alive(holder["pid"]):
                if _remove_if_unchanged(run_dir, path, holder):
                    announce(f"{path}: removed the stale lock of process {holder['pid']} (no longer running)")
                continue
            who = (f"process {holder['pid']} on {holder['host']} since {holder['since']}" if holder
                   else "a process that left an unreadable lock file")
            raise ConfigError(f"{run_dir}: in use by {who} ({path}); wait for that run to finish, or use another "
                              "--run-dir. If that process is gone (a crashed node), delete the lock file") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # stale locks removed, and each time another launch took the lock first
        raise ConfigError(f"{run_dir}: another launch is taking the lock ({path}); try again") from None
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):  # not empty: the run wrote into it
                    run_dir.rmdir()
