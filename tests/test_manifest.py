"""pipeline.manifest: CSV readers, AudioSet and folder sources, quarantine reasons, leak check, ledger counts,
hostile CSV encodings and quoting, entries named like audio that are not readable regular files."""

from __future__ import annotations

import os
import re
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import soundfile

from pipeline.config import SourceConfig, SplitConfig
from pipeline.manifest import (
    MANIFEST_SCHEMA,
    QUARANTINE_SCHEMA,
    ManifestError,
    build_manifest,
    decodable_extensions,
    manifest_classes,
    read_class_labels,
    read_manifest,
    read_segments_csv,
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


# ---------------------------------------------------------------------------------------------------------
# Hostile CSVs: every data line is written or quarantined, and a quarantined row's clip is never written.

GOOD_KEYS = [f"clip_{index:02d}" for index in range(8)]
BOM = b"\xef\xbb\xbf"


def physical_data_lines(data: bytes, header: bool) -> int:
    """Non-blank lines that are not `#` comments, the header line excepted (counted without the reader)."""
    lines = [line for line in re.split(rb"\r\n|\r|\n", data.removeprefix(BOM)) if line.strip()]
    lines = [line for line in lines if not line.lstrip().startswith(b"#")]
    return len(lines) - (1 if header else 0)


# variant -> (rows replacing clip_03's row, line ending, BOM, {key of a quarantined row: reason substring})
HOSTILE_VARIANTS = {
    "bom": (None, "\n", True, {}),
    "crlf": (None, "\r\n", False, {}),
    "cr": (None, "\r", True, {}),
    "unterminated_quote": (['clip_03, 0, 10, "/m/a'], "\n", False, {"clip_03": "unterminated quote"}),
    "embedded_newline": (['clip_03, 0, 10, "/m/a,', '/m/b"'], "\r\n", False,
                         {"clip_03": "unterminated quote", '/m/b"': "expected 4 columns"}),
    "text_after_quote": (['clip_03, 0, 10, "/m/a"x'], "\n", False, {"clip_03": "malformed CSV"}),
    "not_utf8": (['clip_03, 0, 10, "/m/a\udcff"'], "\n", False, {"clip_03": "not valid UTF-8"}),
    "every_field_empty": ([" , , , ", 'clip_03, 0, 10, "/m/a,/m/b"'], "\n", False, {None: "every field is empty"}),
    "bad_row_then_good_row": (['clip_03, abc, 10, "/m/a"', 'clip_03, 0, 10, "/m/a"'], "\n", False,
                              {"clip_03": "not numbers"}),
    "good_row_then_bad_row": (['clip_03, 0, 10, "/m/a"', "clip_03, 0, 10"], "\n", False,
                              {"clip_03": "expected 4 columns"}),
}


def hostile_segments_csv(variant: str) -> tuple[bytes, dict]:
    replacement, newline, bom, bad = HOSTILE_VARIANTS[variant]
    rows = [f'{key}, 0.000, 10.000, "/m/a,/m/b"' for key in GOOD_KEYS]
    if replacement is not None:
        rows[3:4] = replacement
    text = newline.join(["# Segments csv", "# YTID, start_seconds, end_seconds, positive_labels", *rows]) + newline
    return (BOM if bom else b"") + text.encode("utf-8", "surrogateescape"), bad


# The same variants in a folder's `path,labels` CSV: variant -> (rows replacing clip_03's, {key: reason}).
FOLDER_ROWS = {
    "unterminated_quote": (['clip_03.wav,"/m/a'], {"clip_03": "unterminated quote"}),
    # The second line read by itself is an absolute path outside the audio root.
    "embedded_newline": (['clip_03.wav,"/m/a;', '/m/b"'],
                         {"clip_03": "unterminated quote", None: "path outside audio_root"}),
    "text_after_quote": (['clip_03.wav,"/m/a"x'], {"clip_03": "malformed CSV"}),
    "not_utf8": (['clip_03.wav,"/m/a\udcff"'], {"clip_03": "not valid UTF-8"}),
    "every_field_empty": ([" , ", 'clip_03.wav,"/m/a;/m/b"'], {None: "every field is empty"}),
    "bad_row_then_good_row": (["clip_03.wav,/m/a,surplus", "clip_03.wav,/m/a"], {"clip_03": "expected 'path,labels'"}),
    "good_row_then_bad_row": (["clip_03.wav,/m/a", "clip_03,/m/a,surplus"], {"clip_03": "expected 'path,labels'"}),
}


def hostile_labels_csv(variant: str) -> tuple[bytes, dict]:
    """A folder's labels CSV (with a header row, which the BOM precedes) in the given variant."""
    _, newline, bom, _ = HOSTILE_VARIANTS[variant]
    replacement, bad = FOLDER_ROWS.get(variant, (None, {}))
    rows = [f'{key}.wav,"/m/a;/m/b"' for key in GOOD_KEYS]
    if replacement is not None:
        rows[3:4] = replacement
    text = newline.join(["path,labels", *rows]) + newline
    return (BOM if bom else b"") + text.encode("utf-8", "surrogateescape"), bad


CLASSES_AB = "index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n"


@pytest.mark.parametrize("variant", sorted(HOSTILE_VARIANTS))
def test_hostile_segments_csv_loses_no_row(tmp_path: Path, variant: str) -> None:
    data, bad = hostile_segments_csv(variant)
    (tmp_path / "train.csv").write_bytes(data)
    (tmp_path / "classes.csv").write_text(CLASSES_AB)
    for key in GOOD_KEYS:
        write_audio(tmp_path / "audio" / f"{key}.wav", seconds=0.1)
    source = SourceConfig(
        audio_root=str(tmp_path / "audio"), class_labels_csv=str(tmp_path / "classes.csv"),
        splits=[SplitConfig(name="train", csv=str(tmp_path / "train.csv"))],
    )
    manifest, quarantine = build_manifest(source)
    rows = quarantine.to_pylist()
    withheld = {key for key in bad if key in GOOD_KEYS}
    assert manifest.column("key").to_pylist() == [key for key in GOOD_KEYS if key not in withheld]
    assert all(labels == [0, 1] for labels in manifest.column("label_indices").to_pylist())
    assert manifest.num_rows + quarantine.num_rows == physical_data_lines(data, header=False)
    bad_rows = [row for row in rows if row["reason"] == "bad_csv_row"]
    assert {row["key"]: row["detail"] for row in bad_rows}.keys() == bad.keys()
    for row in bad_rows:
        assert bad[row["key"]] in row["detail"], row
        assert re.match(rf"{re.escape(str(tmp_path / 'train.csv'))}:\d+: ", row["detail"]), row
        assert "\udcff" not in row["detail"]
    assert {row["reason"] for row in rows} <= {"bad_csv_row", "duplicate_key"}


def test_hostile_segments_csv_names_the_physical_line(tmp_path: Path) -> None:
    data, _ = hostile_segments_csv("embedded_newline")
    (tmp_path / "train.csv").write_bytes(data)
    segments, bad = read_segments_csv(tmp_path / "train.csv")
    assert [(row.line, row.key) for row in bad] == [(6, "clip_03"), (7, '/m/b"')]
    assert [row.line for row in segments] == [3, 4, 5, 8, 9, 10, 11]
    # An unterminated quote costs its own line only, however long the file.
    rows = [f'key_{index}, 0, 10, "/m/a"' for index in range(773)]
    rows[246] = 'key_246, 0, 10, "/m/a'
    (tmp_path / "long.csv").write_text("\n".join(rows) + "\n")
    segments, bad = read_segments_csv(tmp_path / "long.csv")
    assert (len(segments), [(row.line, row.reason) for row in bad]) == (772, [(247, "unterminated quote")])
    # A field over the csv module's size limit is a bad row too, not a crash.
    (tmp_path / "huge.csv").write_text(f'huge, 0, 10, "{"/m/a," * 40000}"\nsmall, 0, 10, "/m/a"\n')
    segments, bad = read_segments_csv(tmp_path / "huge.csv")
    assert [row.ytid for row in segments] == ["small"]
    assert [(row.line, row.key) for row in bad] == [(1, "huge")] and "field larger" in bad[0].reason


@pytest.mark.parametrize("variant", sorted(HOSTILE_VARIANTS))
def test_hostile_folder_labels_csv_loses_no_row(tmp_path: Path, variant: str) -> None:
    data, bad = hostile_labels_csv(variant)
    (tmp_path / "labels.csv").write_bytes(data)
    for key in GOOD_KEYS:
        write_audio(tmp_path / "audio" / f"{key}.wav", seconds=0.1)
    write_audio(tmp_path / "audio" / "unlisted.wav", seconds=0.1)
    source = SourceConfig(kind="folder", audio_root=str(tmp_path / "audio"),
                          splits=[SplitConfig(name="train", csv=str(tmp_path / "labels.csv"))])
    manifest, quarantine = build_manifest(source)
    withheld = {key for key in bad if key in GOOD_KEYS}
    expected_keys = sorted([key for key in GOOD_KEYS if key not in withheld] + ["unlisted"])
    assert manifest.column("key").to_pylist() == expected_keys
    # No class list: the classes are the labels seen, so a BOM'd header adds no class "labels".
    assert [c.mid for c in manifest_classes(manifest)] == ["/m/a", "/m/b"]
    rows = quarantine.to_pylist()
    bad_rows = {row["key"]: row["detail"] for row in rows if row["reason"] == "bad_csv_row"}
    assert bad_rows.keys() == bad.keys()
    for key, detail in bad_rows.items():
        assert bad[key] in detail and detail.startswith(f"{tmp_path / 'labels.csv'}:")
    # Ledger: CSV data lines + audio files, less the files a CSV line (good or bad) took.
    listed_with_file = len(GOOD_KEYS)
    expected = physical_data_lines(data, header=True) + len(GOOD_KEYS) + 1 - listed_with_file
    assert manifest.num_rows + quarantine.num_rows == expected


def test_folder_bad_row_withholds_its_file_in_every_split(tmp_path: Path) -> None:
    """A key named by a bad row in the eval CSV is not written by the catch-all train split either."""
    for key in ("a", "b", "c"):
        write_audio(tmp_path / "audio" / f"{key}.wav", seconds=0.1)
    (tmp_path / "eval.csv").write_text('b.wav,"/m/x\nc.wav,/m/x\n')
    source = SourceConfig(kind="folder", audio_root=str(tmp_path / "audio"), splits=[
        SplitConfig(name="train", csv="", mix=True),
        SplitConfig(name="eval", csv=str(tmp_path / "eval.csv"), mix=False),
    ])
    manifest, quarantine = build_manifest(source)
    assert list(zip(manifest.column("split").to_pylist(), manifest.column("key").to_pylist())) == [
        ("train", "a"), ("eval", "c")]
    assert [(r["key"], r["split"], r["reason"]) for r in quarantine.to_pylist()] == [("b", "eval", "bad_csv_row")]


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        (BOM + CLASS_LABELS.encode(), None, None),
        (CLASS_LABELS.replace("\n", "\r\n").encode(), None, None),
        (CLASS_LABELS.replace('"Music"', '"Music').encode(), 4, "unterminated quote"),
        (CLASS_LABELS.replace('"Music"', '"Mu\nsic"').encode(), 4, "unterminated quote"),
        (CLASS_LABELS.encode().replace(b"Music", b"Mus\xffic"), 4, "not valid UTF-8"),
        (CLASS_LABELS.replace('"Speech"', '"Speech"!').encode(), 2, "malformed CSV"),
        (b"index,mid,display_name\r\n0,/m/a,A\r\n, , \r\n", 3, "every field is empty"),
    ],
)
def test_hostile_class_labels_csv(tmp_path: Path, content: bytes, line: int | None, message: str | None) -> None:
    path = tmp_path / "class_labels_indices.csv"
    path.write_bytes(content)
    if line is None:
        assert [c.display_name for c in read_class_labels(path)] == ["Speech", "Male speech, man speaking", "Music"]
        return
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(path))}:{line}: {message}"):
        read_class_labels(path)


# ---------------------------------------------------------------------------------------------------------
# Entries named like audio that are not readable regular files: quarantined, never opened.


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


# ---------------------------------------------------------------------------------------------------------
# Folder sources that just work: every decodable extension, listed files under several roots, clear misses


def test_default_extensions_are_every_extension_the_decoder_reads(monkeypatch) -> None:
    extensions = decodable_extensions()
    assert extensions[:4] == ["wav", "flac", "ogg", "mp3"]
    assert {"aiff", "aif", "aifc", "au", "caf", "w64", "rf64", "opus", "oga", "sph"} <= set(extensions)
    assert "raw" not in extensions and len(extensions) == len(set(extensions))
    # Derived from soundfile.available_formats(), not a fixed list.
    monkeypatch.setattr(soundfile, "available_formats", lambda: {"WAV": "", "AIFF": "", "RAW": ""})
    assert decodable_extensions() == ["wav", "aif", "aifc", "aiff", "wave"]


def test_a_folder_of_aiff_au_caf_and_w64_files_is_read_with_the_default_extensions(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    for name, fmt in (("a.aiff", "AIFF"), ("b.aif", "AIFF"), ("c.au", "AU"), ("d.caf", "CAF"), ("e.w64", "W64")):
        audio.mkdir(exist_ok=True)
        soundfile.write(audio / name, np.zeros(1600, dtype=np.float32), 16000, format=fmt)
    (audio / "notes.txt").write_text("not audio")
    manifest, quarantine = build_manifest(SourceConfig(kind="folder", audio_root=str(audio)), probe_audio=True)
    assert manifest.column("key").to_pylist() == ["a", "b", "c", "d", "e"]
    assert manifest.column("duration_s").to_pylist() == [0.1] * 5
    assert quarantine.num_rows == 0


def test_a_listed_file_whose_extension_is_not_accepted_is_missing_naming_the_path_and_the_extensions(
    tmp_path: Path,
) -> None:
    audio = tmp_path / "audio"
    write_audio(audio / "song.aiff")
    (tmp_path / "labels.csv").write_text("path,labels\nsong.aiff,Music\n")
    source = SourceConfig(kind="folder", audio_root=str(audio), extensions=["wav", "flac"],
                          splits=[SplitConfig(name="train", csv=str(tmp_path / "labels.csv"))])
    manifest, quarantine = build_manifest(source)
    assert manifest.num_rows == 0
    (row,) = quarantine.to_pylist()
    assert row["reason"] == "missing_file"
    assert f"{audio}/song.aiff.{{wav,flac}}" in row["detail"]
    assert f"{audio}/song.aiff exists, but its extension 'aiff' is not among data.source.extensions" in row["detail"]


@pytest.fixture
def spread(tmp_path: Path) -> SimpleNamespace:
    """Files spread over two roots, the CSV's folder and an absolute path; some files are listed by no CSV."""
    first, second, lists, elsewhere = (tmp_path / name for name in ("first", "second", "lists", "elsewhere"))
    write_audio(first / "dog" / "a.wav")
    write_audio(first / "unlisted.wav")
    write_audio(second / "dog" / "b.flac")
    write_audio(second / "a.ogg")  # shadowed: "dog/a.wav" resolves under the first root
    write_audio(lists / "local" / "c.wav")
    write_audio(elsewhere / "d.aiff")
    write_audio(elsewhere / "unlisted.wav")
    write_audio(first / "held_out.wav")
    lists.mkdir(exist_ok=True)
    (lists / "train.csv").write_text(
        "path,labels\n"
        "dog/a.wav,Dog\n"
        "dog/b,Dog\n"  # no extension: every accepted one is tried
        "local/c.wav,Cat\n"  # relative to the CSV's folder
        f"{elsewhere / 'd.aiff'},Cat\n"
        "gone.wav,Cat\n"
        "gone_too,Cat\n"
    )
    (lists / "eval.csv").write_text(f"path,labels\n{first / 'held_out.wav'},Dog\n")
    return SimpleNamespace(first=first, second=second, lists=lists, elsewhere=elsewhere)


def test_a_csv_lists_files_under_several_roots_and_only_those_are_read(spread, monkeypatch) -> None:
    scanned = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": scanned.append(path) or real_scandir(path))
    source = SourceConfig(kind="folder", audio_roots=[str(spread.first), str(spread.second)], splits=[
        SplitConfig(name="train", csv=str(spread.lists / "train.csv"), mix=True),
        SplitConfig(name="test", csv=str(spread.lists / "eval.csv"), mix=False)])
    manifest, quarantine = build_manifest(source)
    assert scanned == []  # nothing is scanned: only the listed files are looked up
    rows = {(row["split"], row["key"]): (row["path"], row["label_mids"]) for row in manifest.to_pylist()}
    assert rows == {
        ("train", "dog/a"): (str(spread.first / "dog" / "a.wav"), ["Dog"]),
        ("train", "dog/b"): (str(spread.second / "dog" / "b.flac"), ["Dog"]),
        ("train", "local/c"): (str(spread.lists / "local" / "c.wav"), ["Cat"]),
        ("train", str(spread.elsewhere / "d")): (str(spread.elsewhere / "d.aiff"), ["Cat"]),
        # An absolute path under a root has the key of its path relative to that root.
        ("test", "held_out"): (str(spread.first / "held_out.wav"), ["Dog"]),
    }
    missing = {row["key"]: row for row in quarantine.to_pylist()}
    assert missing.keys() == {"gone", "gone_too"} and {row["reason"] for row in missing.values()} == {"missing_file"}
    tried = missing["gone"]["detail"]
    assert tried.startswith(f"{spread.lists / 'train.csv'}:6: no audio file ")
    for folder in (spread.first, spread.second, spread.lists):
        assert str(folder / "gone.wav") in tried
    assert f"{spread.first / 'gone_too'}.{{wav,flac,ogg,mp3," in missing["gone_too"]["detail"]


def test_one_file_spelled_two_ways_in_a_training_and_an_evaluation_split_is_a_leak(spread) -> None:
    (spread.lists / "eval.csv").write_text(f"path,labels\n{spread.first / 'dog' / 'a.wav'},Dog\n")
    source = SourceConfig(kind="folder", audio_roots=[str(spread.first)], splits=[
        SplitConfig(name="train", csv=str(spread.lists / "train.csv"), mix=True),
        SplitConfig(name="test", csv=str(spread.lists / "eval.csv"), mix=False)])
    with pytest.raises(ManifestError, match=r"1 keys are in both .*dog/a \(eval: test, train: train\)"):
        build_manifest(source)


def test_listed_entries_that_are_not_regular_files_are_quarantined_without_opening_them(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe.wav")
    (root / "folder.wav").mkdir()
    os.symlink(root / "nowhere.wav", root / "broken.wav")
    (tmp_path / "train.csv").write_text("pipe.wav,Dog\nfolder.wav,Dog\nbroken.wav,Dog\n")
    source = SourceConfig(kind="folder", audio_roots=[str(root)],
                          splits=[SplitConfig(name="train", csv=str(tmp_path / "train.csv"))])
    manifest, quarantine = run_bounded(lambda: build_manifest(source, probe_audio=True), 30.0, [root])
    assert manifest.num_rows == 0
    found = {row["key"]: (row["reason"], row["detail"].split(" is ", 1)[1]) for row in quarantine.to_pylist()}
    assert found == {
        "pipe": ("not_regular_file", "a FIFO, not a regular file"),
        "folder": ("not_regular_file", "a directory, not a regular file"),
        "broken": ("not_regular_file", "a symlink whose target cannot be reached (No such file or directory)"),
    }


def test_listed_folder_sources_refuse_a_split_without_csv_and_both_kinds_of_root(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("a.wav,Dog\n")
    with pytest.raises(ManifestError, match=r"every split needs a csv listing its files \(splits \['rest'\]"):
        build_manifest(SourceConfig(kind="folder", audio_roots=[str(tmp_path)], splits=[
            SplitConfig(name="train", csv=str(tmp_path / "train.csv")), SplitConfig(name="rest", csv="")]))
    with pytest.raises(ManifestError, match="audio_root .* or data.source.audio_roots .*, not both"):
        build_manifest(SourceConfig(kind="folder", audio_root=str(tmp_path), audio_roots=[str(tmp_path)]))
    with pytest.raises(ManifestError, match="audio_roots: .*nope.* are not directories"):
        build_manifest(SourceConfig(kind="folder", audio_roots=[str(tmp_path / "nope")], splits=[
            SplitConfig(name="train", csv=str(tmp_path / "train.csv"))]))
