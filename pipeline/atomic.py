"""Atomic, durable writes on a local POSIX filesystem: the one implementation every writer uses.

A file is written under a hidden temporary name in its own directory (`.{name}.tmp-<uuid>`), flushed and
fsynced, renamed over the final name with `os.replace`, and the directory is fsynced so the rename itself
survives a power cut. A reader therefore sees the old file, the new file, or no file; never half of one.
A folder is published the same way: built under a staging name beside the target, then renamed into place.

This module imports nothing of ours, so both bottom layers (`pipeline`, `model`) may use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

TEMPORARY = re.compile(r"\..+\.tmp-[0-9a-f]{32}")  # the names `temporary_path` hands out


def fsync_directory(directory: str | os.PathLike) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def temporary_path(target: str | os.PathLike) -> Path:
    """A fresh hidden name beside `target`, matched by `TEMPORARY` (so stale ones can be found and removed)."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")


def write_with(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(temporary)` (any writer that takes a path: safetensors, parquet, json), then publish.

    The temporary file is removed if `write` or the publication fails; the target is untouched then.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(target)
    try:
        write(temporary)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    return publish_file(temporary, target)


def publish_file(temporary: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make the finished file `temporary` (from `temporary_path(target)`) visible as `target`, durably.

    For writers that stream into the temporary file over time (a parquet writer kept open); the temporary file
    is removed if the publication fails.
    """
    temporary, target = Path(temporary), Path(target)
    try:
        fsync_file(temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    fsync_directory(target.parent)
    return target


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Publish `data` as `target` atomically and durably."""

    def write(temporary: Path) -> None:
        with open(temporary, "xb") as handle:
            handle.write(data)

    return write_with(target, write)


def write_text(target: str | os.PathLike, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_directory(root)


def publish_folder(staging: str | os.PathLike, target: str | os.PathLike, keep_previous: str | os.PathLike | None = None) -> Path:
    """Make the finished folder `staging` visible as `target` with one rename (both in the same directory).

    Every file under `staging` is fsynced first. An existing `target` is moved to `keep_previous` when given
    (replacing an older one there). Without `keep_previous` the target must be absent or empty: a folder that
    another process may be reading is never deleted here (OSError, as `os.replace` gives).
    """
    staging, target = Path(staging), Path(target)
    _fsync_tree(staging)
    if keep_previous is not None and target.exists():
        previous = Path(keep_previous)
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(target, previous)
    os.replace(staging, target)
    fsync_directory(target.parent)
    return target
