"""pipeline.manifest and pipeline.csv_rows on hostile CSVs (BOM, CRLF, CR, quotes left open, embedded line
breaks, bytes that are not UTF-8, empty rows): every data line is written or quarantined, and a quarantined row's
clip is never written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.clips import ManifestError
from pipeline.config import SourceConfig, SplitConfig
from pipeline.csv_rows import read_class_labels, read_segments_csv
from pipeline.manifest import build_manifest, manifest_classes
from test_manifest import CLASS_LABELS, write_audio

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
