"""Hygiene for the whole suite: launcher runs must not leave shared memory behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_MEMORY = Path("/dev/shm")
DEEPSPEED_BUFFERS = "deepspeed_allreduce_buffer_*"


@pytest.fixture(autouse=True)
def remove_deepspeed_shared_memory():
    """DeepSpeed's CPU accelerator maps a ~69 MB all-reduce buffer per rank of a launcher run into /dev/shm and
    never unlinks it: every 2-rank launch would keep ~140 MB of RAM until reboot. Remove what a test left."""
    before = set(SHARED_MEMORY.glob(DEEPSPEED_BUFFERS))
    yield
    for path in set(SHARED_MEMORY.glob(DEEPSPEED_BUFFERS)) - before:
        path.unlink(missing_ok=True)


@pytest.fixture(autouse=True, scope="session")
def registration_key_in_the_session(tmp_path_factory):
    """Registrations are signed with a key file (jobs.registry); the suite uses its own, never the user's."""
    if "SSLAM_REGISTRATION_KEY_FILE" in os.environ:
        yield
        return
    os.environ["SSLAM_REGISTRATION_KEY_FILE"] = str(tmp_path_factory.mktemp("registration") / "registration.key")
    yield
    del os.environ["SSLAM_REGISTRATION_KEY_FILE"]
