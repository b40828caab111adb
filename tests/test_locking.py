"""One preprocessing run per output (pipeline.locking): the flock of a local output, the lease of a URL one."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline import storage
from pipeline.locking import LOCK_NAME, OutputLock, OutputLockedError

HOLD_AND_DIE = """
import os, signal, sys
from pipeline import storage
from pipeline.locking import OutputLock
lock = OutputLock(storage.locate(sys.argv[1])).__enter__()
print("held", flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_held_local_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    location = storage.locate(str(tmp_path / "out"))
    with OutputLock(location) as first:
        with pytest.raises(OutputLockedError) as refused:
            OutputLock(location).__enter__()
        assert refused.value.holder == first.holder
        message = str(refused.value)
        assert f"host {socket.gethostname()}" in message and f"pid {os.getpid()}" in message
        assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == os.getpid()
    with OutputLock(location):  # released: free again
        pass
    assert (tmp_path / "out" / LOCK_NAME).read_text() == ""


def test_the_lock_of_a_sigkilled_holder_is_free(tmp_path):
    output = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_DIE, str(output)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError) as refused:
            OutputLock(storage.locate(str(output))).__enter__()
        assert refused.value.holder["pid"] == holder.pid
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
    with OutputLock(storage.locate(str(output))):  # the kernel dropped the dead holder's lock
        pass


def test_a_lease_on_a_url_refuses_a_second_holder_until_it_expires_or_is_released():
    location = storage.locate(f"memory://lock-test-{uuid.uuid4().hex}/out")
    first = OutputLock(location, ttl_s=30.0, settle_s=0.01).__enter__()
    with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
        OutputLock(location, settle_s=0.01).__enter__()
    first.release()
    assert not location.exists(LOCK_NAME)
    with OutputLock(location, settle_s=0.01):
        pass

    # A holder that died leaves a lease that expires; the next run takes it over.
    dead = {"host": "gone", "pid": 1, "started": "then", "token": "dead", "expires": time.time() - 1}
    location.publish(LOCK_NAME, json.dumps(dead).encode(), done_marker=False)
    with OutputLock(location, settle_s=0.01) as taker:
        assert json.loads(location.read(LOCK_NAME))["token"] == taker.holder["token"]


def test_a_lease_taken_over_is_noticed_by_its_former_holder():
    location = storage.locate(f"memory://lock-test-{uuid.uuid4().hex}/out")
    lock = OutputLock(location, ttl_s=0.3, settle_s=0.01).__enter__()
    try:
        lock.check()
        intruder = {"host": "elsewhere", "pid": 1, "started": "now", "token": "x", "expires": time.time() + 60}
        location.publish(LOCK_NAME, json.dumps(intruder).encode(), done_marker=False)
        time.sleep(0.5)  # more than one renewal period (ttl / 3)
        with pytest.raises(OutputLockedError, match="host elsewhere"):
            lock.check()
    finally:
        lock.release()
    assert location.exists(LOCK_NAME)  # the intruder's lease is not removed by the former holder


def test_a_refused_run_waits_for_the_holder_to_record_itself(tmp_path):
    """The holder writes its info just after taking the flock: a run refused in between still names it."""
    path = tmp_path / LOCK_NAME
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # held, holder info not written yet
        late = {"host": "h", "pid": 42, "started": "s"}
        writer = threading.Timer(0.3, lambda: path.write_text(json.dumps(late)))
        writer.start()
        with pytest.raises(OutputLockedError) as refused:
            OutputLock(storage.locate(str(tmp_path))).__enter__()
        writer.join()
        assert refused.value.holder == late
    finally:
        os.close(descriptor)
