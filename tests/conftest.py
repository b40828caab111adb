"""Hygiene for the whole suite: launcher runs must not leave shared memory behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_MEMORY = Path("/dev/shm")
DEEPSPEED_BUFFERS = "deepspeed_allreduce_buffer_*"


def _mapped_buffers() -> set[str]:
    """The buffers some live process still maps (a launch of another test run on this machine, for one)."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        mapped.update(line.split(maxsplit=5)[-1] for line in text.splitlines() if "deepspeed_allreduce_buffer_" in line)
    return mapped


@pytest.fixture(autouse=True)
def remove_deepspeed_shared_memory():
    """DeepSpeed's CPU accelerator maps a ~69 MB all-reduce buffer per rank of a launcher run into /dev/shm and
    never unlinks it: every 2-rank launch would keep ~140 MB of RAM until reboot. Remove what a test left, but
    never a buffer a running launch maps: its sibling ranks would wait for it forever."""
    before = set(SHARED_MEMORY.glob(DEEPSPEED_BUFFERS))
    yield
    left = set(SHARED_MEMORY.glob(DEEPSPEED_BUFFERS)) - before
    if left:
        in_use = _mapped_buffers()
        for path in left:
            if str(path) not in in_use:
                path.unlink(missing_ok=True)


@pytest.fixture(autouse=True, scope="session")
def registration_key_in_the_session(tmp_path_factory):
    """Registrations are signed with a key file (jobs.mlops.registration); the suite uses its own, never the user's."""
    if "SSLAM_REGISTRATION_KEY_FILE" in os.environ:
        yield
        return
    os.environ["SSLAM_REGISTRATION_KEY_FILE"] = str(tmp_path_factory.mktemp("registration") / "registration.key")
    yield
    del os.environ["SSLAM_REGISTRATION_KEY_FILE"]
