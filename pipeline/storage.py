"""Where bytes live: a `Location` (a local folder, or a folder on any filesystem pyarrow.fs or fsspec
understands) and its file operations: read, exists, list, remove, atomic publication, parquet tables.

Publication (DESIGN.md, "Shard set"): a file is visible under its final name only when complete. In a local
POSIX folder it is written by `pipeline.atomic` (hidden temporary `.{name}.tmp-<uuid>`, fsync, rename, fsync
of the folder). Anywhere else (a URL that `pyarrow.fs` or fsspec understands, e.g. `s3://…`, `memory://…`, or
an explicit `pyarrow.fs.FileSystem`) the final key is written with one stream write of the full bytes, then,
with `done_marker`, the marker `{name}.done` holding the sha256; a file without its marker is not published.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import atomic

logger = logging.getLogger(__name__)

DONE_SUFFIX = ".done"


def check_plain_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"member name {name!r} must be a plain file name")


def _put(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """One stream, one write of the full bytes (one PUT on object storage).

    No `with`: closing after a failed write could complete a partial upload. Even then the missing
    done-marker keeps such an object unpublished.
    """
    stream = filesystem.open_output_stream(path)
    stream.write(data)
    stream.close()


@dataclass(frozen=True)
class Location:
    """A resolved folder: a local POSIX path, or a directory on a pyarrow filesystem. Build it with `locate`."""

    directory: str
    filesystem: pafs.FileSystem | None  # None: local POSIX path, published by rename

    @property
    def is_local(self) -> bool:
        return self.filesystem is None

    def join(self, name: str) -> str:
        if self.filesystem is None:
            return os.path.join(self.directory, name)
        return f"{self.directory.rstrip('/')}/{name}"

    def child(self, name: str) -> Location:
        """The sub-folder `name` on the same filesystem."""
        return Location(self.join(name), self.filesystem)

    def read(self, name: str) -> bytes:
        """The whole content of `name` (FileNotFoundError when it is missing)."""
        if self.filesystem is None:
            with open(self.join(name), "rb") as handle:
                return handle.read()
        with self.filesystem.open_input_stream(self.join(name)) as stream:
            return stream.read()

    def read_optional(self, name: str) -> bytes | None:
        """The content of `name` (a relative path may name a sub-folder's file), None when it cannot be read."""
        try:
            return self.read(name)
        except OSError:
            return None

    def exists(self, name: str) -> bool:
        if self.filesystem is None:
            return os.path.isfile(self.join(name))
        return self.filesystem.get_file_info(self.join(name)).type == pafs.FileType.File

    def publish(self, name: str, data: bytes, done_marker: bool = True) -> str:
        """Make `data` visible as `name` atomically (see the module docstring); returns its sha256 (hex).

        `done_marker` applies to non-local filesystems only: write `{name}.done` (the sha256) after the data.
        """
        check_plain_name(name)
        digest = hashlib.sha256(data).hexdigest()
        if self.filesystem is None:
            atomic.write_bytes(self.join(name), data)
            return digest
        self.filesystem.create_dir(self.directory, recursive=True)
        _put(self.filesystem, self.join(name), data)
        if done_marker:
            _put(self.filesystem, self.join(name + DONE_SUFFIX), digest.encode("ascii"))
        return digest

    def is_published(self, name: str, sha256: str | None = None, size: int | None = None) -> bool:
        """Whether `name` is completely published (and, when `sha256` / `size` is given, has that checksum / size).

        Local: the final file exists (its bytes are hashed when `sha256` is given; its size is compared when
        `size` is given). Elsewhere: the final object and its done-marker exist (the marker's checksum is
        compared when `sha256` is given).
        """
        if not self.exists(name):
            return False
        if self.filesystem is None:
            if size is not None and os.path.getsize(self.join(name)) != size:
                return False
            if sha256 is None:
                return True
            digest = hashlib.sha256()
            with open(self.join(name), "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest() == sha256
        if not self.exists(name + DONE_SUFFIX):
            return False
        if sha256 is None:
            return True
        return self.read(name + DONE_SUFFIX).decode("ascii", errors="replace").strip() == sha256

    def list(self) -> list[str]:
        """Base names of the files directly in the folder (none when it does not exist)."""
        if self.filesystem is None:
            if not os.path.isdir(self.directory):
                return []
            return sorted(name for name in os.listdir(self.directory) if os.path.isfile(self.join(name)))
        selector = pafs.FileSelector(self.directory, allow_not_found=True)
        return sorted(info.base_name for info in self.filesystem.get_file_info(selector) if info.is_file)

    def remove(self, name: str) -> None:
        """Delete one file (a missing one is fine)."""
        with contextlib.suppress(FileNotFoundError):
            if self.filesystem is None:
                os.remove(self.join(name))
            else:
                self.filesystem.delete_file(self.join(name))

    def remove_stale(self) -> list[str]:
        """Remove what an interrupted writer left; returns the removed names. Call only while no writer runs.

        Local: `.{name}.tmp-<uuid>` files. Elsewhere: `*.tar` objects without their done-marker.
        """
        names = self.list()
        if self.filesystem is None:
            stale = [name for name in names if atomic.TEMPORARY.fullmatch(name)]
        else:
            present = set(names)
            stale = [name for name in names if name.endswith(".tar") and name + DONE_SUFFIX not in present]
        for name in stale:
            self.remove(name)
        if stale:
            logger.info("removed %d stale partial outputs from %s", len(stale), self.directory)
        return stale

    def write_table(self, name: str, table: pa.Table) -> str:
        """Publish `table` as parquet `name` (index.parquet, quarantine.parquet) atomically; returns sha256."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        return self.publish(name, buffer.getvalue(), done_marker=False)

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """A parquet table written by `write_table` (only `columns` when given)."""
        return pq.read_table(self.join(name), columns=columns, filesystem=self.filesystem)

    def read_schema(self, name: str) -> pa.Schema:
        return pq.read_schema(self.join(name), filesystem=self.filesystem)


def locate(directory: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> Location:
    """Resolve a local path, a `file://` URL, any URL of pyarrow.fs, or else of fsspec (`memory://`, ...)."""
    if filesystem is not None:
        if isinstance(filesystem, pafs.LocalFileSystem):
            return Location(os.path.abspath(os.fspath(directory)), None)
        return Location(os.fspath(directory), filesystem)
    text = os.fspath(directory)
    if "://" not in text:
        return Location(os.path.abspath(text), None)
    if text.startswith("file://"):
        _, path = pafs.FileSystem.from_uri(text)
        return Location(path, None)
    try:
        resolved, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        fsspec_filesystem, path = fsspec.core.url_to_fs(text)
        resolved = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_filesystem))
    return Location(path, resolved)


def locate_file(path: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> tuple[Location, str]:
    """(the folder's Location, the file name) of a file's local path or URL."""
    parent, _, name = os.fspath(path).rstrip("/").rpartition("/")
    return locate(parent or ".", filesystem), name
