"""Run-folder lock (jobs.train.run_lock) and op-build locks (jobs.train.op_builds), in-process; the launches that use
them are in tests/reliability/test_lifecycle.py."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time

import pytest

from jobs.train import op_builds, run_lock


def test_a_held_run_folder_is_refused_naming_the_holder(tmp_path):
    with run_lock.hold(tmp_path) as lock:
        with pytest.raises(run_lock.RunFolderBusy) as refused:
            run_lock.check_free(tmp_path)
        holder = lock.holder
        assert f"host {socket.gethostname()} pid {holder['pid']} started {holder['started']}" in str(refused.value)
        lock.record("finished", update=7)
    assert run_lock.read_holder(tmp_path)["state"] == "finished"
    run_lock.check_free(tmp_path)  # released


def test_a_lock_whose_process_is_gone_is_taken_over_with_a_warning(tmp_path, caplog):
    # What a SIGKILLed holder leaves: the file says "running", nobody holds the flock.
    (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 99999999, "started": "then",
                                                           "state": "running"}))
    with caplog.at_level(logging.WARNING, logger="sslam.run_lock"):
        with run_lock.hold(tmp_path):
            pass
    assert "taking over the lock of host elsewhere pid 99999999 started then" in caplog.text
    assert run_lock.read_holder(tmp_path)["state"] == "failed"  # nobody recorded another end


def test_a_stale_op_build_lock_is_removed_and_a_held_one_refused_in_bounded_time(tmp_path):
    stale = tmp_path / "py311_cpu" / "stale_op" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    assert op_builds.clear_stale_locks(tmp_path) == [stale] and not stale.exists()

    held = tmp_path / "py311_cpu" / "busy_op" / "lock"
    held.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'w'); print(flush=True); "
                               "time.sleep(60)", str(held)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        began = time.monotonic()
        with pytest.raises(op_builds.OpBuildLocked, match=rf"held by pid \[{holder.pid}\]"):
            op_builds.clear_stale_locks(tmp_path, wait_s=1.0, poll_s=0.1)
        assert time.monotonic() - began < 30
        assert held.exists()
    finally:
        holder.kill()
        holder.wait()


def test_launches_get_a_per_host_extensions_directory_unless_one_is_set():
    environ = {}
    path = op_builds.configure(environ)
    assert environ[op_builds.ENV] == str(path) and path.name == socket.gethostname()
    assert str(op_builds.configure({op_builds.ENV: "/elsewhere"})) == "/elsewhere"
