"""pipeline.atomic: a reader sees the old file or the new one, never a part, and no temporary is left behind."""

import os

import pytest

from pipeline import atomic


def _leftovers(folder):
    return [name for name in os.listdir(folder) if atomic.TEMPORARY.fullmatch(name)]


def test_write_bytes_replaces_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic.write_bytes(target, b"old")
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert _leftovers(target.parent) == []


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "file.json"
    atomic.write_bytes(target, b"old")

    def write_half_then_fail(temporary):
        temporary.write_bytes(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_with(target, write_half_then_fail)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_publish_file_makes_a_streamed_temporary_the_target_durably(tmp_path, monkeypatch):
    target = tmp_path / "out.parquet"
    atomic.write_bytes(target, b"old")
    temporary = atomic.temporary_path(target)
    with open(temporary, "wb") as handle:  # a writer kept open over time, then closed
        handle.write(b"streamed")
    synced = []
    monkeypatch.setattr(atomic, "fsync_directory", lambda directory: synced.append(directory))
    assert atomic.publish_file(temporary, target) == target
    assert target.read_bytes() == b"streamed" and synced == [tmp_path]
    assert _leftovers(tmp_path) == []


def test_a_failed_publish_file_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.parquet"
    atomic.write_bytes(target, b"old")
    temporary = atomic.temporary_path(target)
    temporary.write_bytes(b"new")

    def refuse(source, destination):
        raise OSError("read-only file system")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="read-only"):
        atomic.publish_file(temporary, target)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_temporary_names_are_hidden_unique_and_recognised(tmp_path):
    first, second = atomic.temporary_path(tmp_path / "a.tar"), atomic.temporary_path(tmp_path / "a.tar")
    assert first != second and first.name.startswith(".a.tar.tmp-")
    assert atomic.TEMPORARY.fullmatch(first.name)


def test_publish_folder_swaps_in_the_staging_folder_and_keeps_the_previous_one(tmp_path):
    target, previous = tmp_path / "best", tmp_path / "previous"
    for version in ("1", "2", "3"):
        staging = tmp_path / f".staging-{version}"
        staging.mkdir()
        (staging / "version").write_text(version)
        atomic.publish_folder(staging, target, keep_previous=previous)
        assert not staging.exists()
    assert (target / "version").read_text() == "3"
    assert (previous / "version").read_text() == "2"


def test_publish_folder_without_keeping_fills_an_empty_target_and_never_deletes_a_full_one(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    for version in ("1", "2"):
        staging = tmp_path / f".staging-{version}"
        staging.mkdir()
        (staging / "v").write_text(version)
        if version == "1":
            atomic.publish_folder(staging, target)
        else:
            with pytest.raises(OSError):
                atomic.publish_folder(staging, target)
    assert (target / "v").read_text() == "1"
