"""Fault injection for tests/test_preprocess_cluster.py: on the PYTHONPATH of a preprocessing job, Python imports
this at start-up in every process of the job, the Ray workers included (they inherit the driver's environment).
`SSLAM_PREPROCESS_FAULTS` (JSON) picks the faults of `pipeline.shard_task.process_shard`:

* `{"delay_s": seconds}`: each task sleeps that long before it starts;
* `{"kill_once": {"shard": name, "marker": path}}`: the task of that shard SIGKILLs its own worker the first
  time (the marker file records it; a retry then runs normally).

The hook wraps the function right after its module is first imported (tests/import_hooks.py), so production
code has no test-only branch.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/: the shared import hook

from import_hooks import patch_after_import  # noqa: E402

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


if os.environ.get(FAULTS_ENV):
    patch_after_import(TARGET, functools.partial(_patch, faults=json.loads(os.environ[FAULTS_ENV])))
