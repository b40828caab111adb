"""Where DeepSpeed builds its C++ ops (`TORCH_EXTENSIONS_DIR`) and what happens to a build lock left behind.

torch builds an op under `$TORCH_EXTENSIONS_DIR/py<ver>_<cuda>/<op>/` and serialises builders with a `lock`
file there: whoever creates it builds, everyone else waits until it is gone, without a time limit. A build
killed in its first seconds leaves the file, and every later launch waits forever.

Launches use a per-project, per-host directory (`build/torch_extensions/<host>` beside the code), unless
`TORCH_EXTENSIONS_DIR` is set. Per host, because a lock is judged by the processes of this host: a builder
keeps the lock file open until its build ends, so a lock that no process here has open is stale and is
removed with a warning; one that a live process holds is waited for, at most `wait_s`, then refused with
`OpBuildLocked` naming that process.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import psutil

log = logging.getLogger("sslam.op_builds")

ENV = "TORCH_EXTENSIONS_DIR"
LOCK_WAIT_S = 600.0


class OpBuildLocked(RuntimeError):
    """A live process has held an op-build lock for longer than the wait allows: the message names it."""


def default_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "build" / "torch_extensions" / socket.gethostname()


def configure(environ=os.environ) -> Path:
    """Set TORCH_EXTENSIONS_DIR (unless already set) for this process and the ranks it starts."""
    return Path(environ.setdefault(ENV, str(default_dir())))


def lock_holders(lock: Path) -> list[int]:
    """Pids of this host's processes that have `lock` open."""
    target = os.path.realpath(lock)
    holders = []
    for process in psutil.process_iter():
        try:
            if any(os.path.realpath(f.path) == target for f in process.open_files()):
                holders.append(process.pid)
        except (psutil.Error, OSError):
            continue
    return holders


def clear_stale_locks(root: Path, wait_s: float = LOCK_WAIT_S, poll_s: float = 0.5) -> list[Path]:
    """Remove build locks under `root` that no process holds; wait (bounded) for held ones. Returns the removed."""
    removed = []
    for lock in sorted(Path(root).glob("*/*/lock")):
        deadline = time.monotonic() + wait_s
        while lock.exists():
            holders = lock_holders(lock)
            if not holders:
                log.warning("removing the stale op-build lock %s: no process holds it (an interrupted build)", lock)
                lock.unlink(missing_ok=True)
                removed.append(lock)
                break
            if time.monotonic() > deadline:
                raise OpBuildLocked(
                    f"the op-build lock {lock} has been held by pid {holders} for more than {wait_s:.0f} s; "
                    f"end that build or point {ENV} elsewhere"
                )
            time.sleep(poll_s)
    return removed
