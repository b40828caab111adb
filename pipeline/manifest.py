"""The clip manifest: a source's clips (pipeline.sources) -> an Arrow table + quarantine rows.

This module owns turning what a source gives (`pipeline.sources.SOURCES`, one class per `data.source.kind`)
into the manifest: the leak check between evaluation and training splits, the unknown-label and duplicate-key
decisions, the missing / unusable file rows (reasons: pipeline.clips), optional header probing, and the
parquet I/O of the manifest. It never decodes audio; decoding errors belong to the Ray job.

`extensions` empty (the default) means every extension of a format the installed libsndfile decodes
(`decodable_extensions`, derived from `soundfile.available_formats()` through `FORMAT_EXTENSIONS`).

Labels are MIDs of the class list (`class_labels_csv`); folder labels may also be display names. Without a
class list, the classes are the sorted distinct labels seen in the CSVs (mid = display name = the label).
The class list travels in the manifest's schema metadata (`manifest_classes`).

Paths in the manifest are absolute, so Ray workers with another working directory can open them.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile

from pipeline import atomic
from pipeline.clips import (
    DUPLICATE_KEY, LEAK_EXAMPLES, MISSING_FILE, UNKNOWN_LABEL, Clip, ManifestError, quarantine_row,
)
from pipeline.config import SourceConfig, SplitConfig
from pipeline.csv_rows import ClassLabel
from pipeline.file_checks import check_csv_file
from pipeline.sources import SOURCES, Source

logger = logging.getLogger(__name__)


CLASSES_METADATA_KEY = b"sslam.classes"


# File extensions of each libsndfile format (soundfile.available_formats() names). RAW is headerless (it cannot
# be decoded without being told its layout) and MPC2K has no extension of its own, so neither is listed.
FORMAT_EXTENSIONS = {
    "WAV": ("wav", "wave"), "WAVEX": ("wav",), "FLAC": ("flac",), "OGG": ("ogg", "oga", "opus"), "MP3": ("mp3",),
    "AIFF": ("aiff", "aif", "aifc"), "AU": ("au", "snd"), "AVR": ("avr",), "CAF": ("caf",), "HTK": ("htk",),
    "SVX": ("iff", "svx", "8svx"), "MAT4": ("mat",), "MAT5": ("mat",), "PAF": ("paf",), "PVF": ("pvf",),
    "RF64": ("rf64",), "SD2": ("sd2",), "SDS": ("sds",), "IRCAM": ("sf", "ircam"), "VOC": ("voc",),
    "W64": ("w64",), "NIST": ("nist", "sph"), "WVE": ("wve",), "XI": ("xi",),
}
# Tried first (AudioSet `{ext}` lookup order): the formats AudioSet downloads come in.
PREFERRED_EXTENSIONS = ("wav", "flac", "ogg", "mp3")


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
        # The labels the CSV gave the clip (as written), null where none are known (unlisted files, bad rows).
        pa.field("labels", pa.list_(pa.string())),
    ]
)


def decodable_extensions() -> list[str]:
    """Every file extension of a format the installed libsndfile decodes (`data.source.extensions: []`):
    PREFERRED_EXTENSIONS first, then the others in sorted order."""
    available = {extension for name in soundfile.available_formats() for extension in FORMAT_EXTENSIONS.get(name, ())}
    preferred = [extension for extension in PREFERRED_EXTENSIONS if extension in available]
    return preferred + sorted(available - set(preferred))


def _check_leaks(clips: list[Clip]) -> None:
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


def _probe(path: str) -> tuple[float | None, int | None]:
    """Duration and sample rate from the file header; (None, None) when the header cannot be read."""
    try:
        info = soundfile.info(path)
    except Exception:  # any header problem just means "unknown" here; decoding reports it later
        return None, None
    if info.samplerate <= 0:
        return None, None
    return info.frames / info.samplerate, int(info.samplerate)


def _resolved_splits(config: SourceConfig, source: Source | None) -> list[SplitConfig]:
    """The configured splits (or the source's default ones), checked; `source` None for an unknown kind."""
    splits = list(config.splits)
    if source is not None and not splits:
        splits = source.default_splits()
    if not splits:
        raise ManifestError(f"source kind {config.kind!r} needs at least one split")
    names = [split.name for split in splits]
    if len(set(names)) != len(names):
        raise ManifestError(f"split names must be unique, got {names}")
    if source is not None:
        source.check_splits(splits)
    for split in splits:
        if split.csv:
            check_csv_file(split.csv, f"split {split.name!r}: csv")
    if config.class_labels_csv:
        check_csv_file(config.class_labels_csv, "data.source.class_labels_csv")
    return splits


def build_manifest(
    source: SourceConfig, *, probe_audio: bool = False, probe_workers: int = 8
) -> tuple[pa.Table, pa.Table]:
    """Build the manifest and its quarantine rows from a source.

    With `probe_audio`, duration_s and sample_rate are read from each file's header (soundfile.info,
    in `probe_workers` threads); a header that cannot be read leaves them null. Rows are sorted by split
    order, then key. Raises `ManifestError` for configuration errors and evaluation/training leaks.
    """
    source = replace(source, extensions=list(source.extensions) or decodable_extensions())
    kind = SOURCES.get(source.kind)
    clip_source = None if kind is None else kind(source)
    splits = _resolved_splits(source, clip_source)
    if clip_source is None:
        expected = " or ".join(repr(name) for name in SOURCES)
        raise ManifestError(f"unknown source kind {source.kind!r} (expected {expected})")
    clips, quarantine, withheld = clip_source.clips(splits)
    _check_leaks(clips)
    classes = clip_source.classes(clips)
    lookup: dict[str, int] = {}
    if clip_source.display_names:
        lookup.update({label.display_name: label.index for label in classes})
    lookup.update({label.mid: label.index for label in classes})

    clip_source.locate(clips)
    unknown_labels = {id(clip): [label for label in clip.labels if label not in lookup] for clip in clips}
    for clip in clips:
        if unknown_labels[id(clip)]:
            withheld.setdefault(clip.key, clip.origin)
    kept: list[tuple[Clip, list[int]]] = []
    seen_keys: dict[str, str] = {}
    for clip in clips:
        unknown = unknown_labels[id(clip)]
        if unknown:
            detail = f"{clip.origin}: labels not in the class list: {unknown}"
            quarantine.append(quarantine_row(clip.key, clip.path, clip.split.name, UNKNOWN_LABEL, detail, clip.labels))
            continue
        if clip.key in withheld:
            detail = f"{clip.origin}: key also on the quarantined row {withheld[clip.key]}, so no row of it is written"
            quarantine.append(quarantine_row(clip.key, clip.path, clip.split.name, DUPLICATE_KEY, detail, clip.labels))
            continue
        if clip.key in seen_keys:
            detail = f"{clip.origin}: key already taken by {seen_keys[clip.key]}"
            quarantine.append(quarantine_row(clip.key, clip.path, clip.split.name, DUPLICATE_KEY, detail, clip.labels))
            continue
        seen_keys[clip.key] = clip.origin
        kept.append((clip, list(dict.fromkeys(lookup[label] for label in clip.labels))))

    present: list[tuple[Clip, list[int]]] = []
    for clip, indices in kept:
        if clip.path is None:
            if clip.tried:
                detail = f"{clip.origin}: no audio file {clip.tried}"
            else:
                detail = f"{clip.origin}: no file under {source.audio_root} among: {', '.join(clip.candidates)}"
            path = os.path.join(os.path.abspath(source.audio_root), clip.candidates[0])
            quarantine.append(quarantine_row(clip.key, path, clip.split.name, MISSING_FILE, detail, clip.labels))
        elif clip.file_problem is not None:
            detail = f"{clip.origin}: {clip.path} is {clip.file_problem.what}"
            reason = clip.file_problem.reason
            quarantine.append(quarantine_row(clip.key, clip.path, clip.split.name, reason, detail, clip.labels))
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
    """Write a manifest (or quarantine) table as parquet, atomically and durably (`pipeline.atomic`)."""
    atomic.write_with(path, lambda temporary: pq.write_table(table, temporary))


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read a manifest written by `write_manifest`; refuses a table without the manifest columns."""
    table = pq.read_table(path)
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.schema.names]
    if missing:
        raise ManifestError(f"{path}: not a manifest, missing columns {missing}")
    return table
