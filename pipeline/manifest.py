"""The clip manifest: AudioSet CSVs, the class list, or a folder of audio -> an Arrow table + quarantine rows.

This module owns reading the CSV formats (AudioSet segment lists, `class_labels_indices.csv`, a folder's
`path,labels` list), finding each clip's audio file, the leak check between evaluation and training splits,
and the parquet I/O of the manifest. It never decodes audio; decoding errors belong to the Ray job.

Every CSV data row and every audio file of a folder ends up either as a manifest row or as a quarantine
row (stage "manifest") with one of the reasons below; nothing is dropped silently.

* `bad_csv_row`: wrong column count, empty key, or start/end times that are not finite with 0 <= start < end.
* `unknown_label`: a label that is not in the class list (the whole clip is quarantined).
* `duplicate_key`: the second and later occurrences of a key (in split order, then CSV order).
* `missing_file`: no audio file for the row.
* `unlisted_file`: (folder with several splits) an audio file that no split's CSV lists and no catch-all
  split takes.

AudioSet file names come from `SourceConfig.filename_pattern` formatted with `{ytid}`, `{split}`, `{ext}`,
`{start}` and `{end}`. `{start}`/`{end}` without a format spec are integer milliseconds (`30000`); with a
spec they format as floats, so `{start:.3f}` gives `30.000`. `{ext}` is tried in `extensions` order and the
first existing file wins. The audio root is listed once (top level and one level of subfolders); a name not
found at the top level is looked up by base name in the subfolders (first in sorted order wins).

Folder sources: every file under `audio_root` (recursive) whose extension is in `extensions`; the key is the
relative path without extension. A split's CSV (optional) has rows `path,labels` (an optional header row
`path,labels`, `#` comments) where `path` is relative to `audio_root` (the extension may be omitted) and
`labels` is one field holding labels separated by `;` (or `,` inside quotes). Files listed in a split's CSV
belong to that split; unlisted files go to the catch-all split: the one split without a CSV, or the only
split when there is just one (no splits configured means one split "train", mix=True).

Labels are MIDs of the class list (`class_labels_csv`); folder labels may also be display names. Without a
class list, the classes are the sorted distinct labels seen in the CSVs (mid = display name = the label).
The class list travels in the manifest's schema metadata (`manifest_classes`).

Paths in the manifest are absolute, so Ray workers with another working directory can open them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile

from pipeline.config import SourceConfig, SplitConfig

logger = logging.getLogger(__name__)

STAGE = "manifest"
CLASSES_METADATA_KEY = b"sslam.classes"
# How many leaked keys a ManifestError names.
LEAK_EXAMPLES = 5

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("mix", pa.bool_(), nullable=False),
        pa.field("label_mids", pa.list_(pa.string()), nullable=False),
        pa.field("label_indices", pa.list_(pa.int32()), nullable=False),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("sample_rate", pa.int32()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("path", pa.string()),
        pa.field("split", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)


class ManifestError(ValueError):
    """A configuration or data error that no per-clip quarantine can absorb (leaks, bad class list, ...)."""


class Segment(NamedTuple):
    """One data row of an AudioSet segments CSV."""

    ytid: str
    start_s: float
    end_s: float
    label_mids: tuple[str, ...]
    line: int


class BadRow(NamedTuple):
    """A CSV data row that could not be parsed; `key` is its first field when there is one."""

    line: int
    reason: str
    text: str
    key: str | None


class ClassLabel(NamedTuple):
    index: int
    mid: str
    display_name: str


@dataclass
class _Clip:
    """A manifest candidate before file lookup and quarantine decisions."""

    key: str
    split: SplitConfig
    labels: tuple[str, ...]
    origin: str  # "csv:line" or the audio file's relative path, for quarantine details
    start_s: float | None = None
    end_s: float | None = None
    path: str | None = None  # absolute path when known
    candidates: list[str] = field(default_factory=list)  # relative names tried when path is None


def _data_rows(path: str | os.PathLike) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank, non-comment row; fields are stripped."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, skipinitialspace=True)
        line = reader.line_num + 1
        for fields in reader:
            fields = [value.strip() for value in fields]
            if fields and fields[0].startswith("#"):
                line = reader.line_num + 1
                continue
            if any(fields):
                yield line, fields
            line = reader.line_num + 1


def _row_text(fields: list[str]) -> str:
    return ", ".join(fields)


def _split_labels(text: str) -> tuple[str, ...]:
    """Labels of one field, separated by ',' or ';', de-duplicated in order."""
    labels = (label.strip() for label in re.split(r"[;,]", text))
    return tuple(dict.fromkeys(label for label in labels if label))


def read_segments_csv(path: str | os.PathLike) -> tuple[list[Segment], list[BadRow]]:
    """Read an AudioSet segments CSV (`# ...` header lines, then `YTID, start, end, "mid,mid"`).

    Malformed rows come back as `BadRow`s with their line number and reason, never as exceptions. A header
    row without `#` (`YTID, start_seconds, ...`) is tolerated as the first data row.
    """
    segments: list[Segment] = []
    bad_rows: list[BadRow] = []
    for line, fields in _data_rows(path):
        if not segments and not bad_rows and fields[0].lower() == "ytid":
            continue
        key = fields[0] or None
        if len(fields) != 4:
            bad_rows.append(BadRow(line, f"expected 4 columns, got {len(fields)}", _row_text(fields), key))
            continue
        if key is None:
            bad_rows.append(BadRow(line, "empty YTID", _row_text(fields), None))
            continue
        try:
            start_s, end_s = float(fields[1]), float(fields[2])
        except ValueError:
            bad_rows.append(BadRow(line, "start/end are not numbers", _row_text(fields), key))
            continue
        if not (math.isfinite(start_s) and math.isfinite(end_s) and 0.0 <= start_s < end_s):
            bad_rows.append(BadRow(line, "start/end must satisfy 0 <= start < end", _row_text(fields), key))
            continue
        segments.append(Segment(key, start_s, end_s, _split_labels(fields[3]), line))
    return segments, bad_rows


def read_class_labels(path: str | os.PathLike) -> list[ClassLabel]:
    """Read `class_labels_indices.csv` (`index,mid,display_name`); indices must be 0..n-1 in order."""
    rows = list(_data_rows(path))
    if not rows or [name.lower() for name in rows[0][1]] != ["index", "mid", "display_name"]:
        raise ManifestError(f"{path}: expected the header 'index,mid,display_name'")
    classes: list[ClassLabel] = []
    for line, fields in rows[1:]:
        if len(fields) != 3 or not fields[0].isdigit() or not fields[1]:
            raise ManifestError(f"{path}:{line}: bad class row {_row_text(fields)!r}")
        if int(fields[0]) != len(classes):
            raise ManifestError(f"{path}:{line}: index {fields[0]} out of order (expected {len(classes)})")
        classes.append(ClassLabel(int(fields[0]), fields[1], fields[2]))
    duplicates = [mid for mid, count in Counter(label.mid for label in classes).items() if count > 1]
    if duplicates:
        raise ManifestError(f"{path}: duplicate MIDs {duplicates[:LEAK_EXAMPLES]}")
    if not classes:
        raise ManifestError(f"{path}: no classes")
    return classes


class _Seconds(float):
    """A time that formats as integer milliseconds by default and as a float with an explicit spec."""

    def __format__(self, spec: str) -> str:
        if not spec:
            return str(round(float(self) * 1000))
        return float.__format__(self, spec)


class _AudioIndex:
    """The files of an audio root, listed once: top level by name, one subfolder level by relative path
    and by base name."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.relative: set[str] = set()
        self.by_basename: dict[str, str] = {}
        top = sorted(os.scandir(root), key=lambda entry: entry.name)
        for entry in top:
            if entry.is_file():
                self.relative.add(entry.name)
        for entry in top:
            if entry.is_dir():
                for child in sorted(os.scandir(entry.path), key=lambda child: child.name):
                    if child.is_file():
                        relative = f"{entry.name}/{child.name}"
                        self.relative.add(relative)
                        self.by_basename.setdefault(child.name, relative)

    def find(self, name: str) -> str | None:
        """The relative path of `name` (a relative path from the pattern), or None."""
        if name in self.relative:
            return name
        if "/" not in name:
            return self.by_basename.get(name)
        return None


def _audioset_clips(source: SourceConfig, splits: list[SplitConfig]) -> tuple[list[_Clip], list[dict]]:
    clips: list[_Clip] = []
    quarantine: list[dict] = []
    for split in splits:
        segments, bad_rows = read_segments_csv(split.csv)
        for bad in bad_rows:
            detail = f"{split.csv}:{bad.line}: {bad.reason}: {bad.text}"
            quarantine.append(_quarantine_row(bad.key, None, split.name, "bad_csv_row", detail))
        for segment in segments:
            clip = _Clip(segment.ytid, split, segment.label_mids, f"{split.csv}:{segment.line}")
            clip.start_s, clip.end_s = segment.start_s, segment.end_s
            clips.append(clip)
    return clips, quarantine


def _check_audioset_root(source: SourceConfig) -> None:
    """A missing audio root would turn every clip into a `missing_file` row: refuse it as a config error."""
    root = os.path.abspath(source.audio_root)
    if not os.path.exists(root):
        raise ManifestError(f"data.source.audio_root {root} does not exist")
    if not os.path.isdir(root):
        raise ManifestError(f"data.source.audio_root {root} is not a directory")


def _locate_audioset_files(source: SourceConfig, clips: list[_Clip]) -> None:
    root = os.path.abspath(source.audio_root)
    index = _AudioIndex(root)
    for clip in clips:
        fields = {
            "ytid": clip.key,
            "split": clip.split.name,
            "start": _Seconds(clip.start_s),
            "end": _Seconds(clip.end_s),
        }
        extensions = source.extensions if "{ext" in source.filename_pattern else [""]
        for extension in extensions:
            name = source.filename_pattern.format(ext=extension, **fields)
            clip.candidates.append(name)
            found = index.find(name)
            if found is not None:
                clip.path = os.path.join(root, found)
                break


def _scan_folder(root: str, extensions: Iterable[str]) -> list[str]:
    """Relative (posix) paths of the audio files under root, sorted."""
    wanted = {extension.lower() for extension in extensions}
    found: list[str] = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in files:
            if name.rsplit(".", 1)[-1].lower() in wanted and "." in name:
                found.append(Path(os.path.relpath(os.path.join(directory, name), root)).as_posix())
    return sorted(found)


def _strip_extension(relative: str, extensions: Iterable[str]) -> str:
    stem, dot, extension = relative.rpartition(".")
    if dot and extension.lower() in {value.lower() for value in extensions}:
        return stem
    return relative


def _read_folder_labels(
    split: SplitConfig, root: str, extensions: list[str]
) -> tuple[list[tuple[str, tuple[str, ...], int]], list[dict]]:
    """(key, labels, line) for each row of a folder split's `path,labels` CSV, and its bad rows."""
    rows: list[tuple[str, tuple[str, ...], int]] = []
    quarantine: list[dict] = []
    for line, fields in _data_rows(split.csv):
        if not rows and [value.lower() for value in fields] == ["path", "labels"]:
            continue
        reason = None
        if len(fields) not in (1, 2):
            reason = f"expected 'path,labels', got {len(fields)} columns"
        elif not fields[0]:
            reason = "empty path"
        else:
            relative = fields[0]
            if os.path.isabs(relative):
                relative = os.path.relpath(relative, root)
            relative = Path(os.path.normpath(relative)).as_posix()
            if relative.startswith("../") or relative == "..":
                reason = "path outside audio_root"
        if reason is not None:
            detail = f"{split.csv}:{line}: {reason}: {_row_text(fields)}"
            quarantine.append(_quarantine_row(fields[0] or None, None, split.name, "bad_csv_row", detail))
            continue
        labels = _split_labels(fields[1]) if len(fields) == 2 else ()
        rows.append((_strip_extension(relative, extensions), labels, line))
    return rows, quarantine


def _folder_clips(source: SourceConfig, splits: list[SplitConfig]) -> tuple[list[_Clip], list[dict]]:
    root = os.path.abspath(source.audio_root)
    if not os.path.isdir(root):
        raise ManifestError(f"audio_root {root} is not a directory")
    catch_all = [split for split in splits if not split.csv]
    if len(catch_all) > 1:
        names = [split.name for split in catch_all]
        raise ManifestError(f"folder source: at most one split may have no csv, got {names}")
    catch_all_split = catch_all[0] if catch_all else (splits[0] if len(splits) == 1 else None)

    files = _scan_folder(root, source.extensions)
    files_by_key: dict[str, list[str]] = {}
    for relative in files:
        files_by_key.setdefault(_strip_extension(relative, source.extensions), []).append(relative)

    clips: list[_Clip] = []
    quarantine: list[dict] = []
    listed: dict[str, str] = {}  # key -> name of the first split whose csv lists it
    for split in splits:
        if not split.csv:
            continue
        rows, bad_rows = _read_folder_labels(split, root, source.extensions)
        quarantine.extend(bad_rows)
        for key, labels, line in rows:
            clip = _Clip(key, split, labels, f"{split.csv}:{line}")
            if key in files_by_key:
                clip.path = os.path.join(root, files_by_key[key][0])
            clip.candidates.append(key)
            listed.setdefault(key, split.name)
            clips.append(clip)

    for key, relatives in files_by_key.items():
        # Every file beyond the first with the same key is a duplicate, listed or not.
        for relative in relatives[1:]:
            path = os.path.join(root, relative)
            detail = f"{relative}: key {key!r} already taken by {relatives[0]}"
            split_name = listed.get(key, catch_all_split.name if catch_all_split else None)
            quarantine.append(_quarantine_row(key, path, split_name, "duplicate_key", detail))
        if key in listed:
            continue
        path = os.path.join(root, relatives[0])
        if catch_all_split is None:
            detail = f"{relatives[0]}: listed in no split's csv and no split takes unlisted files"
            quarantine.append(_quarantine_row(key, path, None, "unlisted_file", detail))
            continue
        clip = _Clip(key, catch_all_split, (), relatives[0])
        clip.path = path
        clips.append(clip)
    return clips, quarantine


def _resolve_classes(
    source: SourceConfig, clips: list[_Clip], allow_display_names: bool
) -> tuple[list[ClassLabel], dict[str, int]]:
    """The class list and a lookup from accepted label strings to class index."""
    if source.class_labels_csv:
        classes = read_class_labels(source.class_labels_csv)
    else:
        seen = sorted({label for clip in clips for label in clip.labels})
        classes = [ClassLabel(index, label, label) for index, label in enumerate(seen)]
    lookup: dict[str, int] = {}
    if allow_display_names:
        lookup.update({label.display_name: label.index for label in classes})
    lookup.update({label.mid: label.index for label in classes})
    return classes, lookup


def _check_leaks(clips: list[_Clip]) -> None:
    """Refuse a key that is in an evaluation split (mix=False) and in a training split (mix=True)."""
    splits_by_key: dict[str, dict[bool, list[str]]] = {}
    for clip in clips:
        by_mix = splits_by_key.setdefault(clip.key, {True: [], False: []})
        if clip.split.name not in by_mix[clip.split.mix]:
            by_mix[clip.split.mix].append(clip.split.name)
    leaked = sorted(key for key, by_mix in splits_by_key.items() if by_mix[True] and by_mix[False])
    if leaked:
        examples = ", ".join(
            f"{key} (eval: {'/'.join(splits_by_key[key][False])}, train: {'/'.join(splits_by_key[key][True])})"
            for key in leaked[:LEAK_EXAMPLES]
        )
        raise ManifestError(
            f"{len(leaked)} keys are in both an evaluation split (mix=false) and a training split (mix=true): "
            f"{examples}{', ...' if len(leaked) > LEAK_EXAMPLES else ''}"
        )


def _quarantine_row(key: str | None, path: str | None, split: str | None, reason: str, detail: str) -> dict:
    return {"key": key, "path": path, "split": split, "stage": STAGE, "reason": reason, "detail": detail}


def _probe(path: str) -> tuple[float | None, int | None]:
    """Duration and sample rate from the file header; (None, None) when the header cannot be read."""
    try:
        info = soundfile.info(path)
    except Exception:  # any header problem just means "unknown" here; decoding reports it later
        return None, None
    if info.samplerate <= 0:
        return None, None
    return info.frames / info.samplerate, int(info.samplerate)


def _resolved_splits(source: SourceConfig) -> list[SplitConfig]:
    splits = list(source.splits)
    if source.kind == "folder" and not splits:
        splits = [SplitConfig(name="train", csv="", mix=True)]
    if not splits:
        raise ManifestError(f"source kind {source.kind!r} needs at least one split")
    names = [split.name for split in splits]
    if len(set(names)) != len(names):
        raise ManifestError(f"split names must be unique, got {names}")
    if source.kind == "audioset":
        missing_csv = [split.name for split in splits if not split.csv]
        if missing_csv:
            raise ManifestError(f"audioset splits need a csv: {missing_csv}")
    for split in splits:
        if split.csv and not os.path.isfile(split.csv):
            raise ManifestError(f"split {split.name!r}: csv {split.csv} does not exist")
    return splits


def build_manifest(
    source: SourceConfig, *, probe_audio: bool = False, probe_workers: int = 8
) -> tuple[pa.Table, pa.Table]:
    """Build the manifest and its quarantine rows from a source.

    With `probe_audio`, duration_s and sample_rate are read from each file's header (soundfile.info,
    in `probe_workers` threads); a header that cannot be read leaves them null. Rows are sorted by split
    order, then key. Raises `ManifestError` for configuration errors and evaluation/training leaks.
    """
    splits = _resolved_splits(source)
    if source.kind == "audioset":
        _check_audioset_root(source)
        clips, quarantine = _audioset_clips(source, splits)
    elif source.kind == "folder":
        clips, quarantine = _folder_clips(source, splits)
    else:
        raise ManifestError(f"unknown source kind {source.kind!r} (expected 'audioset' or 'folder')")
    _check_leaks(clips)
    classes, lookup = _resolve_classes(source, clips, allow_display_names=source.kind == "folder")

    if source.kind == "audioset":
        _locate_audioset_files(source, clips)
    kept: list[tuple[_Clip, list[int]]] = []
    seen_keys: dict[str, str] = {}
    for clip in clips:
        unknown = [label for label in clip.labels if label not in lookup]
        if unknown:
            detail = f"{clip.origin}: labels not in the class list: {unknown}"
            quarantine.append(_quarantine_row(clip.key, clip.path, clip.split.name, "unknown_label", detail))
            continue
        if clip.key in seen_keys:
            detail = f"{clip.origin}: key already taken by {seen_keys[clip.key]}"
            quarantine.append(_quarantine_row(clip.key, clip.path, clip.split.name, "duplicate_key", detail))
            continue
        seen_keys[clip.key] = clip.origin
        kept.append((clip, list(dict.fromkeys(lookup[label] for label in clip.labels))))

    present: list[tuple[_Clip, list[int]]] = []
    for clip, indices in kept:
        if clip.path is None:
            tried = ", ".join(clip.candidates)
            detail = f"{clip.origin}: no file under {source.audio_root} among: {tried}"
            path = os.path.join(os.path.abspath(source.audio_root), clip.candidates[0])
            quarantine.append(_quarantine_row(clip.key, path, clip.split.name, "missing_file", detail))
        else:
            present.append((clip, indices))

    split_order = {split.name: position for position, split in enumerate(splits)}
    present.sort(key=lambda item: (split_order[item[0].split.name], item[0].key))
    probes: list[tuple[float | None, int | None]]
    if probe_audio:
        with ThreadPoolExecutor(max_workers=max(1, probe_workers)) as pool:
            probes = list(pool.map(_probe, [clip.path for clip, _ in present]))
    else:
        probes = [(None, None)] * len(present)

    manifest = pa.Table.from_pylist(
        [
            {
                "key": clip.key,
                "path": clip.path,
                "split": clip.split.name,
                "mix": clip.split.mix,
                "label_mids": [classes[index].mid for index in indices],
                "label_indices": indices,
                "start_s": clip.start_s,
                "end_s": clip.end_s,
                "duration_s": duration_s,
                "sample_rate": sample_rate,
            }
            for (clip, indices), (duration_s, sample_rate) in zip(present, probes)
        ],
        schema=MANIFEST_SCHEMA,
    )
    classes_json = json.dumps([list(label) for label in classes]).encode()
    manifest = manifest.replace_schema_metadata({CLASSES_METADATA_KEY: classes_json})

    quarantine.sort(key=lambda row: (split_order.get(row["split"], len(splits)), row["key"] or "", row["reason"]))
    quarantine_table = pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA)
    logger.info(
        "manifest: %d clips, %d quarantined (%s)",
        manifest.num_rows,
        quarantine_table.num_rows,
        dict(Counter(row["reason"] for row in quarantine)),
    )
    return manifest, quarantine_table


def manifest_classes(table: pa.Table) -> list[ClassLabel]:
    """The class list stored in a manifest's schema metadata."""
    metadata = table.schema.metadata or {}
    if CLASSES_METADATA_KEY not in metadata:
        raise ManifestError("manifest has no class list in its metadata")
    return [ClassLabel(int(index), mid, name) for index, mid, name in json.loads(metadata[CLASSES_METADATA_KEY])]


def write_manifest(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a manifest (or quarantine) table as parquet: a temporary name first, then a rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, target)


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read a manifest written by `write_manifest`; refuses a table without the manifest columns."""
    table = pq.read_table(path)
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.schema.names]
    if missing:
        raise ManifestError(f"{path}: not a manifest, missing columns {missing}")
    return table
