"""One preprocessing run per output folder: an exclusive lock that the driver holds for its whole run.

Local path or `file://` mount: `fcntl.flock` on `{output}/_preprocess.lock`, which then holds the holder's
host, pid and start time (JSON). The kernel drops the lock when its holder dies, SIGKILL included, so a lock
is never stale. On NFS, Linux emulates flock with whole-file POSIX locks, so drivers on different nodes
exclude each other too. The file itself stays (deleting a lock file races with a process that has just
opened it); an empty or unreadable file means nobody holds it.

Any other pyarrow/fsspec URL (object storage) has no lock primitive, so the lock is a lease object of the
same name holding {holder, token, expires}. Acquiring reads it (another token whose lease has not expired:
refused), writes its own, waits `settle_s` and reads it back (another token there: that writer came later
and wins, this one is refused). A thread renews the lease every ttl/3 seconds; a holder that dies leaves a
lease that expires ttl seconds after its last renewal. Without a compare-and-swap write this is best effort:
two drivers that both read "free" and write more than `settle_s` apart can both believe they hold it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from pipeline import storage

logger = logging.getLogger(__name__)

LOCK_NAME = "_preprocess.lock"
LEASE_TTL_S = 120.0
LEASE_SETTLE_S = 2.0
# A holder writes its info just after it takes the flock; a refused run waits this long to read it.
HOLDER_WAIT_S = 2.0


class OutputLockedError(RuntimeError):
    """Another run holds the output; `holder` is what it recorded (host, pid, started), or {} if unknown."""

    def __init__(self, where: str, holder: dict):
        self.holder = holder
        described = (
            f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
            if holder
            else "holder unknown"
        )
        super().__init__(
            f"{where} is locked by another preprocessing run ({described}): wait for it to finish, or stop it"
        )


def holder_info() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class OutputLock:
    """Context manager: `with OutputLock(location): ...` holds the output or raises OutputLockedError."""

    def __init__(
        self, location: storage.Location, ttl_s: float = LEASE_TTL_S, settle_s: float = LEASE_SETTLE_S
    ) -> None:
        self.location = location
        self.path = location.join(LOCK_NAME)
        self.ttl_s = ttl_s
        self.settle_s = settle_s
        self.holder = {**holder_info(), "token": uuid.uuid4().hex}
        self._descriptor: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._lost: dict | None = None

    def __enter__(self) -> OutputLock:
        if self.location.is_local:
            self._lock_local()
        else:
            self._take_lease()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    # ---- local: flock

    def _lock_local(self) -> None:
        os.makedirs(self.location.directory, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise OutputLockedError(self.location.directory, _wait_for_holder(self.path)) from None
        payload = json.dumps(self.holder, sort_keys=True).encode("utf-8")
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, payload, 0)
        os.fsync(descriptor)
        self._descriptor = descriptor
        logger.info("locked %s (%s)", self.location.directory, self.path)

    # ---- object storage: lease

    def _read_lease(self) -> dict | None:
        raw = self.location.read_optional(LOCK_NAME)
        try:
            lease = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        return lease if isinstance(lease, dict) else None

    def _write_lease(self) -> None:
        lease = {**self.holder, "expires": time.time() + self.ttl_s}
        self.location.publish(LOCK_NAME, json.dumps(lease, sort_keys=True).encode("utf-8"), done_marker=False)

    def _take_lease(self) -> None:
        where = self.location.join("")
        current = self._read_lease()
        if current and current.get("token") != self.holder["token"] and current.get("expires", 0) > time.time():
            raise OutputLockedError(where, current)
        if current:
            logger.warning("taking over the expired lease of %s (holder %s)", where, current)
        self._write_lease()
        time.sleep(self.settle_s)
        current = self._read_lease()
        if not current or current.get("token") != self.holder["token"]:
            raise OutputLockedError(where, current or {})
        self._renewer = threading.Thread(target=self._renew, name="sslam-lease", daemon=True)
        self._renewer.start()
        logger.info("leased %s until released (ttl %.0f s)", where, self.ttl_s)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            current = self._read_lease()
            if not current or current.get("token") != self.holder["token"]:
                self._lost = current or {}
                logger.error("the lease on %s was taken over by %s", self.path, self._lost)
                return
            self._write_lease()

    def check(self) -> None:
        """Raise OutputLockedError when the lease was lost (another driver took it over); local: never."""
        if self._lost is not None:
            raise OutputLockedError(self.location.join(""), self._lost)

    def release(self) -> None:
        if self._descriptor is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._descriptor, 0)
            os.close(self._descriptor)  # closing drops the flock
            self._descriptor = None
        if self._renewer is not None:
            self._stop.set()
            self._renewer.join()
            self._renewer = None
            current = self._read_lease()
            if current and current.get("token") == self.holder["token"]:
                self.location.remove(LOCK_NAME)


def _wait_for_holder(path: str) -> dict:
    """The holder info of a held lock file; {} when none appears within HOLDER_WAIT_S."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    holder = _read_holder_file(path)
    while not holder and time.monotonic() < deadline:
        time.sleep(0.05)
        holder = _read_holder_file(path)
    return holder


def _read_holder_file(path: str) -> dict:
    try:
        with open(path, "rb") as handle:
            holder = json.loads(handle.read() or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
