"""Fault injection for tests/test_preprocess_cluster.py: on the PYTHONPATH of a preprocessing job, Python imports
this at start-up in every process of the job, the Ray workers included (they inherit the driver's environment).
`SSLAM_PREPROCESS_FAULTS` (JSON) picks the faults of `pipeline.shard_task.process_shard`:

* `{"delay_s": seconds}`: each task sleeps that long before it starts;
* `{"kill_once": {"shard": name, "marker": path}}`: the task of that shard SIGKILLs its own worker the first
  time (the marker file records it; a retry then runs normally).

The hook wraps the function right after its module is first imported, so production code has no test-only
branch.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import os
import signal
import sys
import time

FAULTS_ENV = "SSLAM_PREPROCESS_FAULTS"
TARGET = "pipeline.shard_task"


def _inject(faults: dict, shard: str) -> None:
    if faults.get("delay_s"):
        time.sleep(float(faults["delay_s"]))
    kill = faults.get("kill_once")
    if kill and kill.get("shard") == shard:
        try:
            descriptor = os.open(kill["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(descriptor)
        os.kill(os.getpid(), signal.SIGKILL)


def _patch(module, faults: dict) -> None:
    original = module.process_shard

    # functools.wraps keeps the module and name, so Ray pickles the wrapper by reference to the patched module.
    @functools.wraps(original)
    def process_shard(job):
        _inject(faults, job.name)
        return original(job)

    module.process_shard = process_shard


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, faults: dict) -> None:
        self.faults = faults

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            return None
        execute, faults = spec.loader.exec_module, self.faults

        def exec_module(module):
            execute(module)
            _patch(module, faults)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(FAULTS_ENV):
    sys.meta_path.insert(0, _AfterImport(json.loads(os.environ[FAULTS_ENV])))
