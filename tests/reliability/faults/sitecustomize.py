"""Fault injection for tests/reliability/test_lifecycle.py: on PYTHONPATH, Python imports this at start-up in
every process of a launch. `SSLAM_FAULT` picks the fault, which only rank 0 (RANK=0) suffers:

* `checkpoint_enospc`: torch.save of a file under a `checkpoints/` folder raises OSError(ENOSPC).
* `worker_error`: a DataLoader worker raises while decoding its third group.

The hooks wrap a module's attribute right after the module is first imported (tests/import_hooks.py), so
production code has no test-only branch.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # tests/: the shared import hook

from import_hooks import patch_after_import  # noqa: E402

FAULT = os.environ.get("SSLAM_FAULT", "")


def _patch_torch(module) -> None:
    original = module.save

    def save(obj, f, *args, **kwargs):
        if "/checkpoints/" in str(getattr(f, "name", f)):  # a path, or a file object open on one
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(f))
        return original(obj, f, *args, **kwargs)

    module.save = save


def _patch_reader(module) -> None:
    original = module.decode_group
    calls = {"n": 0}

    def decode(sample, geometry):
        if module.get_worker_info() is not None:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected worker fault")
        return original(sample, geometry)

    module.decode_group = decode


PATCHES = {"checkpoint_enospc": ("torch", _patch_torch), "worker_error": ("pipeline.share_reader", _patch_reader)}


if FAULT in PATCHES and os.environ.get("RANK") == "0":
    patch_after_import(*PATCHES[FAULT])
