"""One process per run directory: ``<run>/.catgrad/lock``.

The lock is a small JSON file (host, pid, the process's start time, SLURM job id, when it was
taken), created atomically with ``os.link`` (a complete file appears under the lock's name or
the call fails; this holds on NFS too, unlike ``O_EXCL`` on old clients) and removed when the job
ends. While held, a background thread touches it every ``stale_after_s / 4`` seconds.

A lock is *stale*, and is taken over, when its owner is gone: on the same host, the pid no longer
exists (or now belongs to a process started at another time: a reused pid); on another host, the
file has not been touched for ``stale_after_s`` seconds. A live owner (a requeued SLURM job whose
predecessor is still shutting down) is waited for up to ``wait_s`` seconds, then the job is
refused with one line.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from experiments.training.errors import ConfigurationError

LOCK_FILE = Path(".catgrad") / "lock"


class RunDirectoryBusy(ConfigurationError):
    """Another live process holds the run directory."""


def process_start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) is parenthesised and may contain spaces.
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def this_owner() -> dict[str, Any]:
    """The lock content describing this process."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_ticks": process_start_ticks(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "taken_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def owner_is_alive(owner: dict[str, Any], age_s: float, stale_after_s: float) -> bool:
    """Whether the process described by ``owner`` (a lock ``age_s`` seconds old) still runs."""
    if owner.get("host") != socket.gethostname():
        return age_s < stale_after_s  # its heartbeat is the only sign of life we can see
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    recorded, current = owner.get("start_ticks"), process_start_ticks(pid)
    return recorded is None or current is None or recorded == current


def describe(owner: dict[str, Any]) -> str:
    slurm = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return (f"pid {owner.get('pid')} on {owner.get('host')}{slurm}, since "
            f"{owner.get('taken_at', '?')}")


class RunLock:
    """The lock of one run directory; use as a context manager, or :meth:`acquire`/:meth:`release`.

    Args:
        directory: the run directory.
        wait_s: how long to wait for a live owner before refusing (``lock_wait_s``).
        stale_after_s: a lock of another host untouched this long is stale.
    """

    def __init__(self, directory: Path, wait_s: float = 120.0, stale_after_s: float = 120.0,
                 poll_s: float = 1.0) -> None:
        if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or wait_s < 0:
            raise ConfigurationError(
                f"lock_wait_s={wait_s!r} is invalid: use a number of seconds >= 0")
        self.path = directory / LOCK_FILE
        self.wait_s = float(wait_s)
        self.stale_after_s = stale_after_s
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._content = ""

    def _try_take(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._content = json.dumps(this_owner())
        temporary = self.path.with_name(f".lock.{socket.gethostname()}.{os.getpid()}")
        temporary.write_text(self._content)
        try:
            os.link(temporary, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            temporary.unlink(missing_ok=True)

    def _read(self) -> tuple[dict[str, Any], float, str] | None:
        """The current owner, the lock's age and its text; None when the lock vanished."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(text)
        except ValueError:
            owner = {}
        return (owner if isinstance(owner, dict) else {}), age, text

    def _recover(self, stale_text: str) -> None:
        """Move a stale lock aside; put it back if another process replaced it meanwhile."""
        aside = self.path.with_name(f".stale.{socket.gethostname()}.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != stale_text:  # a fresh lock taken between our read and move
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Take the lock, recovering stale ones; raise :class:`RunDirectoryBusy` after
        ``wait_s`` seconds of a live owner."""
        deadline = time.monotonic() + self.wait_s
        announced = False
        while not self._try_take():
            state = self._read()
            if state is None:
                continue
            owner, age, text = state
            if not owner_is_alive(owner, age, self.stale_after_s):
                print(f"note: recovered the stale lock of {describe(owner)} on "
                      f"{self.path.parent.parent}", file=sys.stderr)
                self._recover(text)
                continue
            if time.monotonic() >= deadline:
                raise RunDirectoryBusy(
                    f"run directory {self.path.parent.parent} is in use by {describe(owner)} "
                    f"(waited {self.wait_s:.0f} s, lock_wait_s={self.wait_s:g}): let it finish "
                    f"or stop it, or choose another hydra.run.dir/hydra.sweep.dir"
                )
            if not announced:
                print(f"waiting up to {self.wait_s:.0f} s for {describe(owner)} to release "
                      f"{self.path.parent.parent}", file=sys.stderr)
                announced = True
            time.sleep(self.poll_s)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 4):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        try:
            if self.path.read_text() == self._content:
                self.path.unlink()
                self.path.parent.rmdir()  # only when empty: a job refused before any work
        except (FileNotFoundError, OSError):
            pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
