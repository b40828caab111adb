"""One job per run folder: the job's rank 0 holds an exclusive lock on `train.output_dir/run.lock` while it runs.

The lock is an `fcntl.flock` on that file, so it ends with the process that holds it, however it ends. The file
itself says who holds (or last held) it, as JSON: host, pid, start time, the launch id (`SSLAM_LAUNCH_ID`,
set by `sslam pretrain`) and the state: "running" while the job runs, then "finished", "preempted" or "failed".
A second job on the folder is refused (`RunFolderBusy`, exit 2) naming the holder; a lock that is free while
its file still says "running" belonged to a process that is gone: it is taken over with a warning.

Only rank 0 locks: one lock per job, on the one folder every rank writes to. On a shared file system the lock
is as good as its flock: NFSv4 and most cluster file systems carry it between hosts (Lustre needs `-o flock`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("sslam.run_lock")

LOCK_FILE = "run.lock"
LAUNCH_ID_ENV = "SSLAM_LAUNCH_ID"


class RunFolderBusy(RuntimeError):
    """Another live job holds the run folder: the message names it."""


def read_holder(output_dir: str | Path) -> dict:
    """What the lock file says (empty when there is none or it is unreadable)."""
    try:
        return json.loads((Path(output_dir) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (the lock file names none)"
    return f"host {holder.get('host')} pid {holder.get('pid')} started {holder.get('started')}"


def _open_locked(output_dir: Path) -> int:
    path = output_dir / LOCK_FILE
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderBusy(
            f"train.output_dir={output_dir} is in use by another job ({describe(read_holder(output_dir))}; "
            f"lock {path}): one job per run folder"
        ) from None
    return fd


def check_free(output_dir: str | Path) -> None:
    """Raise RunFolderBusy now when a job holds the folder (the launcher's early check; rank 0 locks for real)."""
    os.close(_open_locked(Path(output_dir)))


class RunLock:
    """The held lock; `state` records how the job ended, for whoever reads the file next."""

    def __init__(self, fd: int, holder: dict):
        self._fd, self.holder = fd, holder

    def record(self, state: str, **details) -> None:
        self.holder = {**self.holder, "state": state, **details}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(self.holder) + "\n").encode(), 0)
        os.fsync(self._fd)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


@contextmanager
def hold(output_dir: str | Path) -> Iterator[RunLock]:
    """Lock `output_dir` for this process; the state stays "failed" unless the caller records another one."""
    output_dir = Path(output_dir)
    fd = _open_locked(output_dir)
    previous = read_holder(output_dir)
    if previous.get("state") == "running":
        log.warning("train.output_dir=%s: taking over the lock of %s, whose process is gone", output_dir,
                    describe(previous))
    lock = RunLock(fd, {
        "host": socket.gethostname(), "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "launch_id": os.environ.get(LAUNCH_ID_ENV, ""),
    })
    lock.record("running")
    try:
        yield lock
    finally:
        if lock.holder.get("state") == "running":
            lock.record("failed")
        lock.release()
