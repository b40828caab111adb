"""The layout of a shard-set folder, as the preprocessing job writes it and `sslam inspect` reads it: the
names of its files (manifest, plan, index and quarantine tables, dataset.json, fingerprint.json, the
`_records/` folder), the dataset fingerprint and its inputs, the per-shard resume records (what a later run
reads to skip a finished shard: fingerprint, size, sha256, and the state of every source file), the
fingerprint an output holds, and the removal of a whole set (`--overwrite`). It also owns what a shard
location means (`split_location`: the folder or URL holding dataset.json, and an optional glob / brace
pattern of shard names) and the reading of a set's dataset.json (`read_dataset_info`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from typing import Any

import pyarrow as pa

from pipeline import atomic, plan, shards, storage
from pipeline.config import AudioConfig, DataConfig, MixingConfig
from pipeline.preprocess_errors import PreprocessConfigError

FORMAT_VERSION = 1
MANIFEST_TABLE = "manifest.parquet"
PLAN_TABLE = "plan.parquet"
INDEX_TABLE = "index.parquet"
QUARANTINE_TABLE = "quarantine.parquet"
DATASET_INFO = "dataset.json"
FINGERPRINT_RECORD = "fingerprint.json"
RECORDS_DIR = "_records"
# Records of format 1 lack the source files' states: their shards are built again.
RECORD_FORMAT = 2
PATTERN_CHARACTERS = set("*?[{")


def feature_parameters(audio_cfg: AudioConfig, patch_size: int) -> dict[str, Any]:
    """Everything that decides a clip's features: the front-end config and the patch size."""
    return {**dataclasses.asdict(audio_cfg), "patch_size": patch_size}


def dataset_fingerprint(
    plan_fingerprint: str, audio_cfg: AudioConfig, mixing_cfg: MixingConfig, patch_size: int
) -> str:
    """sha256 of (format version, plan fingerprint, feature parameters, mixing config)."""
    payload = {
        "format": FORMAT_VERSION,
        "plan": plan_fingerprint,
        "features": feature_parameters(audio_cfg, patch_size),
        "mixing": dataclasses.asdict(mixing_cfg),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _flat(prefix: str, values: dict) -> dict[str, Any]:
    return {f"{prefix}.{name}": value for name, value in sorted(values.items())}


def fingerprint_inputs(data: DataConfig, patch_size: int, manifest: pa.Table, plan_table: pa.Table) -> dict[str, Any]:
    """What decides the dataset fingerprint, flat and named like the config keys (fingerprint.json, dataset.json)."""
    clips = Counter(manifest.column("split").to_pylist())
    return {
        "format": FORMAT_VERSION,
        "manifest.sha256": plan.manifest_digest(manifest),
        **{f"manifest.clips.{split}": count for split, count in sorted(clips.items())},
        "data.shards.seed": data.shards.seed,
        "data.shards.groups_per_shard": data.shards.groups_per_shard,
        "data.shards.clips_per_eval_shard": data.shards.clips_per_eval_shard,
        "model.patch_size": patch_size,
        **_flat("data.audio", dataclasses.asdict(data.audio)),
        **_flat("data.mixing", dataclasses.asdict(data.mixing)),
        "plan.sha256": plan.plan_fingerprint(plan_table),
    }


def fingerprint_differences(held: dict[str, Any] | None, planned: dict[str, Any]) -> list[str]:
    """`name: value in the output != value now` for every input that differs (held None: none recorded)."""
    if held is None:
        return ["the output records no fingerprint inputs (written by an earlier version of the job)"]
    differences = []
    for name in sorted(set(held) | set(planned)):
        if held.get(name) != planned.get(name):
            before, now = held.get(name, "absent"), planned.get(name, "absent")
            differences.append(f"{name}: {before!r} in the output != {now!r} now")
    return differences or ["none of the recorded inputs (the planning code differs)"]


def record_name(shard: str) -> str:
    return f"{shard}.json"


def source_state(path: str, with_hash: bool) -> list | None:
    """[size, mtime_ns] of a source file (+ its sha256 hex with `with_hash`); None when it cannot be read."""
    try:
        info = os.stat(path)
        state: list = [info.st_size, info.st_mtime_ns]
        if with_hash:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            state.append(digest.hexdigest())
    except OSError:
        return None
    return state


def compact_record(record: dict) -> dict:
    """A record as the driver keeps it: its index rows as an Arrow table (far smaller than dicts at scale)."""
    return {**record, "index": shards.index_table(record["index"])}


def finished_record(location: storage.Location, name: str, fingerprint: str, rehash: bool = False) -> dict | None:
    """The record of a shard a previous run finished with this fingerprint, or None. A local shard must have the
    recorded size (and, with `rehash`, the recorded sha256); a remote one a done-marker holding the sha256.
    The source files are compared separately (`changed_sources`)."""
    raw = location.read_optional(f"{RECORDS_DIR}/{record_name(name)}")
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if record.get("format") != RECORD_FORMAT or record.get("fingerprint") != fingerprint or record.get("shard") != name:
        return None
    local = location.is_local
    checksum = record.get("sha256") if rehash or not local else None
    if not location.is_published(name, checksum, size=record.get("bytes", -1) if local else None):
        return None
    return record


def changed_sources(recorded: dict, current: dict[str, list | None], with_hash: bool) -> list[str]:
    """Keys whose recorded source state differs from `current` (size and mtime; the sha256 too with `with_hash`,
    when a recorded state without one counts as changed). A file that cannot be read now has changed."""
    compared = 3 if with_hash else 2
    changed = []
    for key, state in current.items():
        before = recorded.get(key)
        if state is None or before is None or len(before) < compared or before[:compared] != state[:compared]:
            changed.append(key)
    return changed


def held_fingerprint(location: storage.Location) -> tuple[str, dict | None] | None:
    """(fingerprint, its inputs or None) of the set an output holds: fingerprint.json, else an older dataset.json."""
    for name in (FINGERPRINT_RECORD, DATASET_INFO):
        raw = location.read_optional(name)
        if raw is None:
            continue
        try:
            held = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PreprocessConfigError(
                f"{location.join(name)} is not JSON: remove it, or run with --overwrite"
            ) from None
        if isinstance(held, dict) and isinstance(held.get("fingerprint"), str):
            inputs = held.get("inputs", held.get("fingerprint_inputs"))
            return held["fingerprint"], inputs if isinstance(inputs, dict) else None
    return None


def _is_set_file(name: str) -> bool:
    """A shard, its done-marker, or a temporary of an interrupted publication."""
    shard = name[: -len(storage.DONE_SUFFIX)] if name.endswith(storage.DONE_SUFFIX) else name
    return bool(plan.SHARD_NAME.fullmatch(shard) or atomic.TEMPORARY.fullmatch(name))


def remove_shard_set(location: storage.Location) -> int:
    """Remove every file of the shard set in `location`; returns how many. dataset.json goes first (no reader
    takes a half-removed set for a set), fingerprint.json last (an interrupted removal is still refused
    without --overwrite). Other files, and the lock, stay."""
    records = location.child(RECORDS_DIR)
    present = set(location.list())
    doomed = [name for name in (DATASET_INFO, INDEX_TABLE, QUARANTINE_TABLE) if name in present]
    doomed += sorted(name for name in present if _is_set_file(name))
    removed = 0
    for name in doomed:
        location.remove(name)
        removed += 1
    for name in records.list():
        if name.endswith(".json") or atomic.TEMPORARY.fullmatch(name):
            records.remove(name)
            removed += 1
    for name in (MANIFEST_TABLE, PLAN_TABLE, FINGERPRINT_RECORD):
        if name in present:
            location.remove(name)
            removed += 1
    return removed


def split_location(location: str) -> tuple[str, str | None]:
    """(root holding dataset.json, shard-name pattern or None) of a folder, URL, glob, brace pattern or json."""
    text = str(location).rstrip("/")
    if text.startswith("pipe:"):
        raise ValueError(f"{location!r}: give the folder or URL that holds {DATASET_INFO}, not a pipe: command")
    parent, _, last = text.rpartition("/")
    if last == DATASET_INFO:
        return parent or ".", None
    if PATTERN_CHARACTERS & set(last):
        if PATTERN_CHARACTERS & set(parent):
            raise ValueError(f"{location!r}: only the file-name part of a shard pattern may hold wildcards")
        return parent or ".", last
    return text, None


def read_dataset_info(location: str) -> dict:
    """The parsed, checked `dataset.json` of a shard location (folder, URL, glob/brace pattern or the json itself):
    a 'splits' mapping and a frame geometry (positive target_length, mel_bins, patch_size; T a multiple of the patch)."""
    root, _ = split_location(location)
    try:
        data = storage.locate(root).read(DATASET_INFO)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no {DATASET_INFO} in {root} (shard location {location!r})") from error
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{root}/{DATASET_INFO} is not UTF-8 JSON: {error}") from error
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise ValueError(f"{root}/{DATASET_INFO} has no 'splits' mapping")
    for key in ("target_length", "mel_bins", "patch_size"):
        if not isinstance(info.get(key), int) or isinstance(info[key], bool) or info[key] < 1:
            raise ValueError(f"{root}/{DATASET_INFO}: {key!r} must be a positive integer")
    if info["target_length"] % info["patch_size"]:
        raise ValueError(f"{root}/{DATASET_INFO}: target_length is not a multiple of patch_size")
    return info


def write_dataset_info(location: storage.Location, info: dict) -> None:
    """Publish the set's `dataset.json` (last, after the shards and tables it describes)."""
    location.publish(DATASET_INFO, json.dumps(info, indent=2).encode("utf-8"), done_marker=False)
