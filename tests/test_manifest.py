"""pipeline.manifest: CSV readers, AudioSet and folder sources, quarantine reasons, leak check, ledger counts,
entries named like audio that are not readable regular files (hostile CSVs: test_manifest_hostile_csv.py;
folder sources read with the default extensions or from several roots: test_manifest_folders.py)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import soundfile

from pipeline.clips import ManifestError
from pipeline.config import SourceConfig, SplitConfig
from pipeline.csv_rows import read_class_labels, read_segments_csv
from pipeline.manifest import (
    MANIFEST_SCHEMA,
    QUARANTINE_SCHEMA,
    build_manifest,
    manifest_classes,
    read_manifest,
    write_manifest,
)

CLASS_LABELS = """index,mid,display_name
0,/m/09x0r,"Speech"
1,/t/dd00088,"Male speech, man speaking"
2,/m/04rlf,"Music"
"""

TRAIN_CSV = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=8, num_segs=8, num_unique_labels=3, num_positive_labels=10
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
-0RWZT-miFs, 420.000, 430.000, "/m/04rlf"
zz_wrong_cols, 1.000, 2.000
bad_times_01, abc, 10.000, "/m/04rlf"
backwards_01, 20.000, 10.000, "/m/04rlf"
unknown_mid1, 0.000, 10.000, "/m/09x0r,/m/nope"
--PJHxphWEs, 50.000, 60.000, "/m/04rlf"
missing_abc, 0.000, 10.000, "/m/04rlf"
"""

EVAL_CSV = """# YTID, start_seconds, end_seconds, positive_labels
evalclip_01, 5.500, 15.500, "/m/04rlf"
"""


def write_audio(path: Path, seconds: float = 0.5, sample_rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = 0.1 * np.sin(np.arange(int(seconds * sample_rate)) * 0.05)
    fmt = path.suffix[1:].upper()
    soundfile.write(path, samples.astype(np.float32), sample_rate, format=fmt)


@pytest.fixture
def audioset(tmp_path: Path) -> SourceConfig:
    (tmp_path / "class_labels_indices.csv").write_text(CLASS_LABELS)
    (tmp_path / "train.csv").write_text(TRAIN_CSV)
    (tmp_path / "eval.csv").write_text(EVAL_CSV)
    audio = tmp_path / "audio"
    write_audio(audio / "--PJHxphWEs.flac")
    write_audio(audio / "--PJHxphWEs.ogg")  # flac comes first in `extensions`, so it wins
    write_audio(audio / "sub" / "-0RWZT-miFs.wav", sample_rate=8000)  # found one subfolder down
    write_audio(audio / "evalclip_01.wav")
    return SourceConfig(
        kind="audioset",
        audio_root=str(audio),
        class_labels_csv=str(tmp_path / "class_labels_indices.csv"),
        filename_pattern="{ytid}.{ext}",
        extensions=["flac", "wav", "ogg"],
        splits=[
            SplitConfig(name="train", csv=str(tmp_path / "train.csv"), mix=True),
            SplitConfig(name="eval", csv=str(tmp_path / "eval.csv"), mix=False),
        ],
    )


def test_read_segments_csv_parses_official_format_and_reports_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(TRAIN_CSV)
    rows, bad = read_segments_csv(tmp_path / "train.csv")
    assert [row.ytid for row in rows] == ["--PJHxphWEs", "-0RWZT-miFs", "unknown_mid1", "--PJHxphWEs", "missing_abc"]
    assert rows[0].start_s == 30.0 and rows[0].end_s == 40.0
    assert rows[0].label_mids == ("/m/09x0r", "/t/dd00088")
    assert rows[0].line == 4
    assert [(b.line, b.key) for b in bad] == [(6, "zz_wrong_cols"), (7, "bad_times_01"), (8, "backwards_01")]
    assert "3" in bad[0].reason and "4 columns" in bad[0].reason


def test_read_class_labels_keeps_order_and_quoted_names(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text(CLASS_LABELS)
    classes = read_class_labels(tmp_path / "labels.csv")
    assert [(c.index, c.mid, c.display_name) for c in classes] == [
        (0, "/m/09x0r", "Speech"),
        (1, "/t/dd00088", "Male speech, man speaking"),
        (2, "/m/04rlf", "Music"),
    ]
    (tmp_path / "bad.csv").write_text("index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n")
    with pytest.raises(ManifestError, match="out of order"):
        read_class_labels(tmp_path / "bad.csv")


def test_audioset_manifest_and_quarantine(audioset: SourceConfig) -> None:
    manifest, quarantine = build_manifest(audioset, probe_audio=True)
    assert manifest.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    assert quarantine.schema.equals(QUARANTINE_SCHEMA)
    rows = manifest.to_pylist()
    # Sorted by split order, then key.
    assert [(r["split"], r["key"]) for r in rows] == [
        ("train", "--PJHxphWEs"),
        ("train", "-0RWZT-miFs"),
        ("eval", "evalclip_01"),
    ]
    first, second, evaluation = rows
    assert first["path"].endswith("audio/--PJHxphWEs.flac")
    assert Path(first["path"]).is_absolute()
    assert second["path"].endswith("audio/sub/-0RWZT-miFs.wav")
    assert first["label_mids"] == ["/m/09x0r", "/t/dd00088"] and first["label_indices"] == [0, 1]
    assert (first["start_s"], first["end_s"], first["mix"]) == (30.0, 40.0, True)
    assert evaluation["mix"] is False and evaluation["start_s"] == 5.5
    assert second["sample_rate"] == 8000 and second["duration_s"] == pytest.approx(0.5)
    assert [c.mid for c in manifest_classes(manifest)] == ["/m/09x0r", "/t/dd00088", "/m/04rlf"]

    reasons = {(r["key"], r["reason"]) for r in quarantine.to_pylist()}
    assert reasons == {
        ("zz_wrong_cols", "bad_csv_row"),
        ("bad_times_01", "bad_csv_row"),
        ("backwards_01", "bad_csv_row"),
        ("unknown_mid1", "unknown_label"),
        ("--PJHxphWEs", "duplicate_key"),
        ("missing_abc", "missing_file"),
    }
    assert set(quarantine.column("stage").to_pylist()) == {"manifest"}
    duplicate = next(r for r in quarantine.to_pylist() if r["reason"] == "duplicate_key")
    assert ":10:" in duplicate["detail"]  # the second occurrence (line 10) is the one refused
    missing = next(r for r in quarantine.to_pylist() if r["reason"] == "missing_file")
    assert "missing_abc.flac" in missing["detail"] and "missing_abc.ogg" in missing["detail"]


def test_audioset_ledger_reconciles(audioset: SourceConfig) -> None:
    manifest, quarantine = build_manifest(audioset)
    data_rows = sum(len(rows) + len(bad) for rows, bad in (read_segments_csv(s.csv) for s in audioset.splits))
    assert data_rows == 9
    assert manifest.num_rows + quarantine.num_rows == data_rows
    assert manifest.column("duration_s").null_count == manifest.num_rows  # not probed


@pytest.mark.parametrize(
    ("pattern", "file_name"),
    [
        ("{ytid}.{ext}", "abcdefghijk.wav"),
        ("Y{ytid}.{ext}", "Yabcdefghijk.wav"),
        ("{ytid}_{start}_{end}.{ext}", "abcdefghijk_30000_40000.wav"),
        ("{ytid}_{start:.3f}_{end:.3f}.{ext}", "abcdefghijk_30.000_40.000.wav"),
        ("{split}/{ytid}.{ext}", "train/abcdefghijk.wav"),
    ],
)
def test_filename_patterns(tmp_path: Path, pattern: str, file_name: str) -> None:
    (tmp_path / "train.csv").write_text('abcdefghijk, 30.000, 40.000, "/m/x"\n')
    write_audio(tmp_path / "audio" / file_name)
    source = SourceConfig(
        audio_root=str(tmp_path / "audio"),
        filename_pattern=pattern,
        splits=[SplitConfig(name="train", csv=str(tmp_path / "train.csv"))],
    )
    manifest, quarantine = build_manifest(source)
    assert quarantine.num_rows == 0
    assert manifest.column("path").to_pylist() == [str(tmp_path / "audio" / file_name)]
    # Without a class list the classes are the labels seen.
    assert manifest.column("label_indices").to_pylist() == [[0]]


def test_extension_discovery_follows_extension_order(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text('clip_a, 0, 10, "/m/x"\nclip_b, 0, 10, "/m/x"\n')
    write_audio(tmp_path / "audio" / "clip_a.wav")
    write_audio(tmp_path / "audio" / "clip_a.flac")
    write_audio(tmp_path / "audio" / "clip_b.ogg")
    source = SourceConfig(
        audio_root=str(tmp_path / "audio"),
        extensions=["flac", "ogg", "wav"],
        splits=[SplitConfig(name="train", csv=str(tmp_path / "train.csv"))],
    )
    manifest, _ = build_manifest(source)
    assert [Path(p).name for p in manifest.column("path").to_pylist()] == ["clip_a.flac", "clip_b.ogg"]


def test_leak_between_eval_and_train_raises(audioset: SourceConfig, tmp_path: Path) -> None:
    (tmp_path / "eval.csv").write_text(EVAL_CSV + '-0RWZT-miFs, 0.000, 10.000, "/m/04rlf"\n')
    with pytest.raises(ManifestError, match=r"-0RWZT-miFs \(eval: eval, train: train\)"):
        build_manifest(audioset)


def test_same_key_in_two_training_splits_is_a_duplicate_not_a_leak(audioset: SourceConfig, tmp_path: Path) -> None:
    (tmp_path / "more.csv").write_text('evalclip_01x, 0, 10, "/m/04rlf"\n-0RWZT-miFs, 0, 10, "/m/04rlf"\n')
    audioset.splits.insert(1, SplitConfig(name="more", csv=str(tmp_path / "more.csv"), mix=True))
    manifest, quarantine = build_manifest(audioset)
    duplicates = [r for r in quarantine.to_pylist() if r["reason"] == "duplicate_key"]
    assert {(r["key"], r["split"]) for r in duplicates} == {("--PJHxphWEs", "train"), ("-0RWZT-miFs", "more")}


def test_manifest_parquet_round_trip(audioset: SourceConfig, tmp_path: Path) -> None:
    manifest, quarantine = build_manifest(audioset)
    write_manifest(manifest, tmp_path / "out" / "manifest.parquet")
    write_manifest(quarantine, tmp_path / "out" / "quarantine.parquet")
    restored = read_manifest(tmp_path / "out" / "manifest.parquet")
    assert restored.equals(manifest)
    assert manifest_classes(restored) == manifest_classes(manifest)
    with pytest.raises(ManifestError, match="not a manifest"):
        read_manifest(tmp_path / "out" / "quarantine.parquet")


def folder_tree(root: Path) -> None:
    for relative in ["dogs/a.wav", "dogs/b.flac", "cats/c.ogg", "cats/c.wav", "top.wav"]:
        write_audio(root / relative)
    (root / "notes.txt").write_text("not audio")


def test_folder_without_labels(tmp_path: Path) -> None:
    folder_tree(tmp_path / "audio")
    source = SourceConfig(kind="folder", audio_root=str(tmp_path / "audio"), extensions=["wav", "flac", "ogg"])
    manifest, quarantine = build_manifest(source)
    assert manifest.column("key").to_pylist() == ["cats/c", "dogs/a", "dogs/b", "top"]
    assert set(manifest.column("split").to_pylist()) == {"train"}
    assert manifest.column("label_mids").to_pylist() == [[], [], [], []]
    assert manifest.column("start_s").null_count == 4
    # cats/c.ogg and cats/c.wav share a key: the second (sorted) is the duplicate.
    assert [(r["key"], r["reason"], Path(r["path"]).name) for r in quarantine.to_pylist()] == [
        ("cats/c", "duplicate_key", "c.wav")
    ]
    assert manifest.num_rows + quarantine.num_rows == 5  # every audio file, notes.txt is not audio


def test_folder_with_labels_csv(tmp_path: Path) -> None:
    folder_tree(tmp_path / "audio")
    (tmp_path / "labels.csv").write_text(
        "path,labels\n"
        'dogs/a.wav,"Speech;Music"\n'
        'dogs/b,"/m/04rlf,/m/09x0r"\n'
        "gone.wav,Music\n"
        "top.wav,Barking\n"
        "too,many,columns\n"
    )
    (tmp_path / "class_labels_indices.csv").write_text(CLASS_LABELS)
    source = SourceConfig(
        kind="folder",
        audio_root=str(tmp_path / "audio"),
        class_labels_csv=str(tmp_path / "class_labels_indices.csv"),
        extensions=["wav", "flac", "ogg"],
        splits=[SplitConfig(name="train", csv=str(tmp_path / "labels.csv"), mix=True)],
    )
    manifest, quarantine = build_manifest(source)
    rows = {r["key"]: r for r in manifest.to_pylist()}
    assert sorted(rows) == ["cats/c", "dogs/a", "dogs/b"]
    assert rows["dogs/a"]["label_indices"] == [0, 2]  # display names resolve to indices
    assert rows["dogs/b"]["label_mids"] == ["/m/04rlf", "/m/09x0r"]
    assert rows["cats/c"]["label_mids"] == []  # unlisted file joins the only split unlabelled
    reasons = sorted((r["key"], r["reason"]) for r in quarantine.to_pylist())
    assert reasons == [
        ("cats/c", "duplicate_key"),
        ("gone", "missing_file"),
        ("too", "bad_csv_row"),
        ("top", "unknown_label"),
    ]
    # Ledger: 5 audio files + the csv rows that match no file (gone.wav, the bad row).
    assert manifest.num_rows + quarantine.num_rows == 5 + 2


def test_folder_with_several_splits(tmp_path: Path) -> None:
    folder_tree(tmp_path / "audio")
    (tmp_path / "eval.csv").write_text("dogs/a.wav,\n")
    source = SourceConfig(
        kind="folder",
        audio_root=str(tmp_path / "audio"),
        extensions=["wav", "flac", "ogg"],
        splits=[
            SplitConfig(name="train", csv="", mix=True),
            SplitConfig(name="eval", csv=str(tmp_path / "eval.csv"), mix=False),
        ],
    )
    manifest, _ = build_manifest(source)
    assert list(zip(manifest.column("split").to_pylist(), manifest.column("key").to_pylist())) == [
        ("train", "cats/c"),
        ("train", "dogs/b"),
        ("train", "top"),
        ("eval", "dogs/a"),
    ]
    # With a csv on every split, files listed nowhere are quarantined.
    (tmp_path / "train.csv").write_text("dogs/b.flac,\n")
    source.splits[0].csv = str(tmp_path / "train.csv")
    manifest, quarantine = build_manifest(source)
    assert sorted(manifest.column("key").to_pylist()) == ["dogs/a", "dogs/b"]
    unlisted = sorted(r["key"] for r in quarantine.to_pylist() if r["reason"] == "unlisted_file")
    assert unlisted == ["cats/c", "top"]


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        build_manifest(SourceConfig(splits=[SplitConfig(csv=str(tmp_path / "nope.csv"))]))
    with pytest.raises(ManifestError, match="unknown source kind"):
        (tmp_path / "a.csv").write_text("")
        build_manifest(SourceConfig(kind="s3", splits=[SplitConfig(csv=str(tmp_path / "a.csv"))]))


def test_a_csv_path_that_is_not_a_regular_file_is_a_config_error(tmp_path: Path) -> None:
    """A FIFO as a CSV would block the job on open: refused from stat, naming the key and what the path is."""
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "train.csv").write_text('a, 0, 10, "/m/a"\n')
    for split_csv, classes_csv, message in [
        ("fifo.csv", "", r"split 'train': csv .*fifo.csv is a FIFO"),
        ("dir.csv", "", r"split 'train': csv .*dir.csv is a directory"),
        ("train.csv", "fifo.csv", r"data.source.class_labels_csv .*fifo.csv is a FIFO"),
    ]:
        source = SourceConfig(audio_root=str(tmp_path),
                              class_labels_csv=str(tmp_path / classes_csv) if classes_csv else "",
                              splits=[SplitConfig(name="train", csv=str(tmp_path / split_csv))])
        with pytest.raises(ManifestError, match=message):
            run_bounded(lambda: build_manifest(source), 30, [tmp_path])


def test_empty_tables_keep_their_schema(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("# only a header\n")
    manifest, quarantine = build_manifest(
        SourceConfig(audio_root=str(tmp_path), splits=[SplitConfig(csv=str(tmp_path / "train.csv"))])
    )
    assert manifest.num_rows == 0 and quarantine.num_rows == 0
    assert isinstance(manifest, pa.Table)
    assert manifest.schema.names == MANIFEST_SCHEMA.names


def make_odd_entries(directory: Path, names: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Create entries by kind: dir, fifo, socket, broken_link, loop_link, dir_link, locked (no read permission;
    as root, where chmod does not stop reads, os.access is made to say so)."""
    directory.mkdir(parents=True, exist_ok=True)
    locked: set[str] = set()
    for name, kind in names.items():
        path = directory / name
        if kind == "dir":
            write_audio(path / "inner.wav", seconds=0.1)  # a directory named like audio, holding a real clip
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "socket":
            monkeypatch.chdir(directory)  # AF_UNIX paths are limited to ~100 bytes: bind a relative name
            server = socket.socket(socket.AF_UNIX)
            server.bind(name)
            server.close()  # the socket file stays
        elif kind == "broken_link":
            path.symlink_to(directory / "nowhere.wav")
        elif kind == "loop_link":
            path.symlink_to(path)
        elif kind == "dir_link":
            path.symlink_to(directory / "some_dir.wav" if (directory / "some_dir.wav").is_dir() else directory)
        elif kind == "locked":
            write_audio(path, seconds=0.1)
            path.chmod(0)
            locked.add(str(path))
    if locked and os.access(next(iter(locked)), os.R_OK):
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) not in locked and real_access(p, mode, **kw))


def release_fifo_readers(root: Path) -> None:
    """Open every FIFO under root for writing once, so a reader blocked in open() gets EOF and its thread ends."""
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # no reader waiting
                    pass


def run_bounded(function: Callable[[], Any], seconds: float, fifo_roots: list[Path]) -> Any:
    """function() in a daemon thread (a thread stuck in open() cannot be joined); past `seconds`, the FIFOs
    under fifo_roots are opened for writing so blocked readers get EOF, and the test fails."""
    outcome: list = []

    def call() -> None:
        try:
            outcome.append(function())
        except BaseException as error:  # handed to the test thread below
            outcome.append(error)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    if not outcome:
        for _ in range(100):  # readers may reach the next FIFO after one is released
            for root in fifo_roots:
                release_fifo_readers(root)
            worker.join(0.1)
        pytest.fail(f"did not finish in {seconds} s (an entry that blocks on open was opened?)")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def build_in_thread(source: SourceConfig, seconds: float = 30.0) -> tuple[pa.Table, pa.Table]:
    """build_manifest with probing (soundfile opens files), failing instead of hanging if a FIFO is opened."""
    return run_bounded(lambda: build_manifest(source, probe_audio=True), seconds, [Path(source.audio_root)])


ODD_KINDS = {
    "x.wav": "dir", "y.flac": "fifo", "s.wav": "socket", "broken.wav": "broken_link", "loop.wav": "loop_link",
    "dirlink.wav": "dir_link", "locked.wav": "locked",
}
ODD_WHAT = {
    "dir": "a directory", "fifo": "a FIFO", "socket": "a socket", "broken_link": "a symlink whose target",
    "loop_link": "a symlink whose target", "dir_link": "a symlink to a directory", "locked": "without read permission",
}


def test_folder_entries_that_are_not_regular_files_are_quarantined(tmp_path: Path, monkeypatch) -> None:
    audio = tmp_path / "audio"
    write_audio(audio / "good.wav", seconds=0.1)
    make_odd_entries(audio, ODD_KINDS, monkeypatch)
    write_audio(audio / "renamed.wav", seconds=0.1)
    os.rename(audio / "renamed.wav", os.fsencode(audio) + b"/bad\xffname.wav")
    os.mkfifo(audio / "listed.ogg")  # listed by the labels CSV, and a FIFO
    (tmp_path / "labels.csv").write_text("listed.ogg,Dog\ngood.wav,Cat\n")
    source = SourceConfig(kind="folder", audio_root=str(audio), extensions=["wav", "flac", "ogg"],
                          splits=[SplitConfig(name="train", csv=str(tmp_path / "labels.csv"))])
    manifest, quarantine = build_in_thread(source)
    assert manifest.column("key").to_pylist() == ["good", "x.wav/inner"]
    assert manifest.column("sample_rate").to_pylist() == [16000, 16000]
    rows = {row["key"]: row for row in quarantine.to_pylist()}
    expected = {name.rsplit(".", 1)[0]: kind for name, kind in ODD_KINDS.items()}
    assert rows.keys() == set(expected) | {"listed", "bad\ufffdname"}
    for key, kind in expected.items():
        reason = "unreadable_file" if kind == "locked" else "not_regular_file"
        assert (rows[key]["reason"], rows[key]["stage"], rows[key]["split"]) == (reason, "manifest", "train")
        assert ODD_WHAT[kind] in rows[key]["detail"] and rows[key]["path"].startswith(str(audio)), rows[key]
    assert rows["listed"]["reason"] == "not_regular_file" and "labels.csv:1" in rows["listed"]["detail"]
    assert rows["bad\ufffdname"]["reason"] == "bad_file_name"
    # Ledger: 11 audio-named entries + 2 CSV rows - 2 entries those rows took.
    assert manifest.num_rows + quarantine.num_rows == 11


def test_audioset_candidates_that_are_not_regular_files_are_quarantined(tmp_path: Path, monkeypatch) -> None:
    audio = tmp_path / "audio"
    write_audio(audio / "good.wav", seconds=0.1)
    make_odd_entries(audio, ODD_KINDS, monkeypatch)
    make_odd_entries(audio / "sub", {"deep.wav": "fifo"}, monkeypatch)
    os.mkfifo(audio / "both.flac")  # flac comes first, but is a FIFO: the regular wav wins
    write_audio(audio / "both.wav", seconds=0.1)
    keys = ["good", *(name.rsplit(".", 1)[0] for name in ODD_KINDS), "deep", "both"]
    (tmp_path / "train.csv").write_text("".join(f'{key}, 0, 10, "/m/a"\n' for key in keys))
    source = SourceConfig(audio_root=str(audio), extensions=["flac", "wav"],
                          splits=[SplitConfig(name="train", csv=str(tmp_path / "train.csv"))])
    manifest, quarantine = build_in_thread(source)
    assert manifest.column("path").to_pylist() == [str(audio / "both.wav"), str(audio / "good.wav")]
    rows = {row["key"]: row for row in quarantine.to_pylist()}
    expected = {**{name.rsplit(".", 1)[0]: kind for name, kind in ODD_KINDS.items()}, "deep": "fifo"}
    assert rows.keys() == set(expected)
    for key, kind in expected.items():
        reason = "unreadable_file" if kind == "locked" else "not_regular_file"
        assert rows[key]["reason"] == reason and ODD_WHAT[kind] in rows[key]["detail"], rows[key]
    assert rows["deep"]["path"] == str(audio / "sub" / "deep.wav")
    assert manifest.num_rows + quarantine.num_rows == len(keys)


def test_folder_subdirectory_that_cannot_be_listed_is_quarantined(tmp_path: Path, monkeypatch) -> None:
    audio = tmp_path / "audio"
    write_audio(audio / "good.wav", seconds=0.1)
    write_audio(audio / "closed" / "hidden.wav", seconds=0.1)
    real_scandir = os.scandir

    def scandir(path):
        if str(path) == str(audio / "closed"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    manifest, quarantine = build_manifest(SourceConfig(kind="folder", audio_root=str(audio)))
    assert manifest.column("key").to_pylist() == ["good"]
    assert [(r["key"], r["reason"], r["path"]) for r in quarantine.to_pylist()] == [
        (None, "unreadable_file", str(audio / "closed"))]
