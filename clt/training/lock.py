"""One trainer per run directory: `run_dir/.lock` names its holder (host, pid, Slurm job, start
time) and is refreshed every `HEARTBEAT` seconds while training runs.

A second trainer pointed at a locked run_dir stops with an error naming the holder. A lock whose
holder is gone is taken over with a warning: on the same host, its process no longer exists; on
another host, it has not been refreshed for `STALE_AFTER` seconds. A requeued Slurm job (the same
job id, the same array task) takes over its own earlier lock at once. Only the first process of a
multi-process run holds the lock (its other ranks write nothing of their own into run_dir).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import ConfigError

HEARTBEAT = 30.0  # seconds between refreshes of the lock file's time stamp
STALE_AFTER = 600.0  # a lock from another host not refreshed for this long is stale


def _slurm_job() -> str | None:
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def first_process() -> bool:
    """Whether this is rank 0 of its run (by the launchers' environment: torchrun/Lightning's
    LOCAL_RANK and NODE_RANK, srun's SLURM_PROCID)."""
    return all(int(os.environ.get(k) or 0) == 0 for k in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {since}"


class RunLock:
    """`with RunLock(run_dir):` holds run_dir's lock for the block (module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": _slurm_job(),
            "started": time.time(),
        }
        self.created_dir = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stale(self, holder: dict) -> str | None:
        """Why `holder`'s lock may be taken over (None: it may not)."""
        if holder.get("slurm_job") and holder.get("slurm_job") == self.me["slurm_job"]:
            return f"the earlier run of this Slurm job ({describe(holder)})"
        if holder.get("host") == self.me["host"]:
            if holder.get("pid") == self.me["pid"]:
                return "this process's own lock"
            return None if _alive(int(holder.get("pid", -1))) else f"its holder is gone ({describe(holder)})"
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:  # gone meanwhile
            return "it was removed meanwhile"
        if age > STALE_AFTER:
            return f"not refreshed for {age:.0f} s ({describe(holder)})"
        return None

    def acquire(self) -> None:
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self.created_dir = True
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me))
            break
        else:
            raise ConfigError(f"could not take the lock {self.path}: another process keeps writing it")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="clt-run-lock")
        self._thread.start()

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _take_over_or_refuse(self) -> None:
        """The lock exists: refuse (its holder is alive) or remove it with a warning (stale)."""
        holder = self._holder()
        if not holder:  # being written by another process this instant, or torn: look again
            time.sleep(0.2)
            holder = self._holder()
        why = self._stale(holder) if holder else "an unreadable lock file"
        if why is None:
            self._undo_dir()
            raise ConfigError(
                f"run_dir={str(self.run_dir)!r} is being trained by another process "
                f"({describe(holder)}); stop it first, or train into another run_dir "
                f"(a stale lock is taken over by itself: {self.path})"
            )
        print(f"warning: taking over the lock of {self.run_dir}: {why}", file=sys.stderr)
        self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _ours(self) -> bool:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        return holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]

    def _undo_dir(self) -> None:
        if self.created_dir:
            try:
                self.run_dir.rmdir()  # only if nothing else was written
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._ours():
            self.path.unlink(missing_ok=True)
        if self.created_dir and self.run_dir.exists() and not any(self.run_dir.iterdir()):
            self._undo_dir()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
