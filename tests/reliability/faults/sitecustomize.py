"""Fault injection for tests/reliability/test_lifecycle.py: on PYTHONPATH, Python imports this at start-up in
every process of a launch. `SSLAM_FAULT` picks the fault, which only rank 0 (RANK=0) suffers:

* `checkpoint_enospc`: torch.save of a file under a `checkpoints/` folder raises OSError(ENOSPC).
* `worker_error`: a DataLoader worker raises while decoding its third group.

The hooks wrap a module's attribute right after the module is first imported, so production code has no
test-only branch.
"""

from __future__ import annotations

import errno
import importlib.abc
import importlib.machinery
import os
import sys

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


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            return None
        execute, patch = spec.loader.exec_module, self.patch

        def exec_module(module):
            execute(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


if FAULT in PATCHES and os.environ.get("RANK") == "0":
    sys.meta_path.insert(0, _AfterImport(*PATCHES[FAULT]))
