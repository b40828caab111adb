"""The Ray preprocessing pipeline: manifest -> seeded plan -> one Ray task per output shard -> shard set + ledger.

Driver (`run_pipeline`): build the manifest, make the plan (on the driver, seeded: the plan alone decides
every shard's bytes, whatever the cluster size), skip the shards a previous run finished, remove stale
temporaries, then run one task per remaining shard and stream their results with `ray.wait`. At the end it
writes `index.parquet`, `quarantine.parquet` and `dataset.json`, reads the two tables back and checks the
ledger: per mixture epoch of a mix split, every manifest clip is written as a primary exactly once or
quarantined (evaluation splits: written or quarantined).

Task (`process_shard`): decode every distinct clip of the shard (`audio.load_waveform`), run the one batched
front-end (`audio.fbank_batch`) over them, form the mixtures (`logmel_max` or `waveform_sum`, or none when
`materialize_mixtures` is false), encode the samples and publish the shard (`shards.write_shard`: visible under
its final name only when complete). A clip that fails becomes a quarantine row (stage `decode` with
`AudioError.reason`, or `features`); the slots it leaves in a group are completed with filler clips of the same
shard (recorded as `filler` in the sample json and the index); a group without any valid primary is dropped.
Per-clip errors never fail a task. Torch runs single-threaded inside a task, so a shard's bytes do not depend
on the worker's thread count.

One run per output: the driver holds `pipeline.locking.OutputLock` on the output for its whole run (flock on
a POSIX path, a renewed lease object on object storage); a second run is refused (OutputLockedError) naming
the holder's host, pid and start time, before it plans or writes anything.

One plan per output: before the first shard the driver publishes `fingerprint.json`, the dataset fingerprint
and its inputs (manifest digest and clip counts, seed, layout, front-end, mixing, plan digest). A run whose
fingerprint differs from the one the output holds (fingerprint.json, else an older dataset.json) is refused
(FingerprintMismatchError, exit 2) naming the inputs that differ, unless `overwrite` is set: then every file
of the old set is removed first (dataset.json first, fingerprint.json last; files that are not the shard
set's stay). Every index row carries the fingerprint of the run that wrote its shard.

Resume: after publishing a shard the task writes `_records/{shard}.json` (dataset fingerprint, size, sha256, index
and quarantine rows, stats, and [size, mtime_ns] of every source file it read, stat'ed before decoding, plus
the file's sha256 with `data.shards.hash_sources_on_resume`). A later run skips a shard whose record has the
same fingerprint, whose source files are unchanged and which is published: locally with the recorded size (its
bytes re-hashed against the sha256 only with `data.shards.verify_checksums_on_resume`, since that reads the whole
output), remotely with a done-marker holding the sha256. A shard with a changed source file is built again,
and the index, quarantine and ledger are rebuilt from all records. A finished job re-run does nothing and says so.

Output location: a local path (refused when the Ray cluster has more than one node: every node would write
to its own disk), a `file://` URL (a POSIX mount that the operator asserts every node shares; published by
rename), or any pyarrow/fsspec URL (one PUT + a done-marker).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from tqdm import tqdm

from pipeline import audio, mixing, plan, shards
from pipeline.clips import ManifestError
from pipeline.config import AudioConfig, DataConfig, MixingConfig
from pipeline.locking import OutputLock
from pipeline.manifest import QUARANTINE_SCHEMA as MANIFEST_QUARANTINE_SCHEMA
from pipeline.manifest import build_manifest, manifest_classes

logger = logging.getLogger(__name__)

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
SOURCE_STAT_WORKERS = 16
MANIFEST_STAGE = "manifest"
DECODE_STAGE = "decode"
FEATURES_STAGE = "features"
# Test-only fault injection (JSON): {"delay_s": seconds before each task, "kill_once": {"shard": name,
# "marker": path}} makes the task of that shard SIGKILL its own worker the first time (the marker records it).
FAULTS_ENV = "SSLAM_PREPROCESS_FAULTS"
# How many class names one line of the class coverage names.
PROBLEMS_NAMED = 10

QUARANTINE_SCHEMA = pa.schema(
    list(MANIFEST_QUARANTINE_SCHEMA) + [pa.field("epoch", pa.int32()), pa.field("shard", pa.string())]
)


class PreprocessError(RuntimeError):
    """The job ran but its output is incomplete (failed shards)."""


class LedgerError(PreprocessError):
    """The written index and quarantine do not account for every manifest clip."""


class PreprocessConfigError(ValueError):
    """A configuration or input that the job refuses before running anything."""


class FingerprintMismatchError(PreprocessConfigError):
    """The output holds a shard set of another plan; `differences` names each input that differs."""

    def __init__(self, output: str, held: str, planned: str, differences: list[str]):
        self.differences = differences
        super().__init__(
            f"{output} holds the shard set of another plan (fingerprint {held[:12]}, this run's {planned[:12]}); "
            f"differing: {'; '.join(differences)}. Write to another data.shards.output, or run with --overwrite "
            "to remove the old set and build this one"
        )


# ---------------------------------------------------------------------------------------------------------
# Fingerprints and checks


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


def check_config(data: DataConfig, patch_size: int) -> None:
    """Refuse settings the job cannot honour (raised before Ray or any file is touched)."""
    audio_cfg, mixing_cfg = data.audio, data.mixing
    if patch_size < 1 or audio_cfg.target_length % patch_size:
        raise PreprocessConfigError(
            f"data.audio.target_length ({audio_cfg.target_length}) must be a multiple of the patch size ({patch_size})"
        )
    if mixing_cfg.domain not in mixing.DOMAINS:
        raise PreprocessConfigError(f"data.mixing.domain must be one of {mixing.DOMAINS}, got {mixing_cfg.domain!r}")
    if mixing_cfg.mix_padding not in mixing.MIX_PADDINGS:
        raise PreprocessConfigError(
            f"data.mixing.mix_padding must be one of {mixing.MIX_PADDINGS}, got {mixing_cfg.mix_padding!r}"
        )
    if mixing_cfg.domain == "waveform_sum" and not mixing_cfg.materialize_mixtures:
        raise PreprocessConfigError(
            "data.mixing.domain=waveform_sum needs materialize_mixtures: true (the loader can only form "
            "log-mel max mixtures)"
        )
    if mixing_cfg.domain == "waveform_sum" and mixing_cfg.mix_padding != "zero":
        raise PreprocessConfigError("data.mixing.mix_padding applies to logmel_max only; use 'zero' with waveform_sum")
    try:
        mixing.nomix_rows(audio_cfg.target_length // patch_size, mixing_cfg.nomix_rows)
    except ValueError as error:
        raise PreprocessConfigError(f"data.mixing.nomix_rows: {error}") from None
    if not data.shards.output:
        raise PreprocessConfigError("data.shards.output is empty")


def check_output_location(output: str) -> None:
    """Refuse a plain local output path on a multi-node cluster, and a relative one inside a job's working_dir."""
    if "://" in output:
        return
    alive = [node for node in ray.nodes() if node.get("Alive")]
    if len(alive) > 1:
        raise PreprocessConfigError(
            f"data.shards.output={output!r} is a local path but the Ray cluster has {len(alive)} nodes: each node "
            "would write its shards to its own disk. Use a shared filesystem URL: file:///path for a POSIX mount "
            "that every node sees (NFS, Lustre, ...), or s3://, gs://, ... for object storage."
        )
    working_dir = (ray.get_runtime_context().runtime_env or {}).get("working_dir")
    if working_dir and not os.path.isabs(output):
        raise PreprocessConfigError(
            f"data.shards.output={output!r} is relative and this job runs in an uploaded working_dir "
            f"({working_dir}), which Ray deletes afterwards: use an absolute path or a URL"
        )


# ---------------------------------------------------------------------------------------------------------
# The task: one output shard


@dataclass(frozen=True)
class ShardJob:
    """Everything one task needs; `rows` are the shard's plan rows (dicts of plan.PLAN_SCHEMA columns)."""

    name: str
    mix: bool
    rows: list[dict]
    output: str  # absolute local directory or URL
    audio: AudioConfig
    mixing: MixingConfig
    patch_size: int
    nomix_rows: int
    seed: int
    fingerprint: str
    hash_sources: bool = False


@dataclass
class _Group:
    sample: int
    keys: list[str]
    filler: list[bool]
    windows: list[tuple[int, int]]


def _inject_test_faults(shard: str) -> None:
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return
    faults = json.loads(spec)
    if faults.get("delay_s"):
        time.sleep(float(faults["delay_s"]))
    kill = faults.get("kill_once")
    if kill and kill.get("shard") == shard:
        try:
            descriptor = os.open(kill["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(descriptor)
        logger.warning("test fault: killing the worker of %s (pid %d)", shard, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)


def _quarantine_row(job: ShardJob, row: dict, stage: str, reason: str, detail: str) -> dict:
    split, epoch, _ = plan.parse_shard_name(job.name)
    return {
        "key": row["key"],
        "path": row["path"],
        "split": split,
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "epoch": epoch,
        "shard": job.name,
    }


def _decode_clips(job: ShardJob, clips: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """Waveforms of the clips that decode, and (stage, reason, detail) of those that do not."""
    waves: dict[str, torch.Tensor] = {}
    failures: dict[str, tuple[str, str, str]] = {}
    for key, row in clips.items():
        try:
            waves[key] = audio.load_waveform(row["path"], job.audio)
        except audio.AudioError as error:
            failures[key] = (DECODE_STAGE, error.reason, error.detail)
        except Exception as error:  # a decoder bug must not lose the shard: the clip is quarantined instead
            logger.warning("%s: unexpected error decoding %s", job.name, row["path"], exc_info=True)
            failures[key] = (DECODE_STAGE, "unexpected_error", f"{type(error).__name__}: {error}")
    return waves, failures


def _features(
    job: ShardJob, waves: dict[str, torch.Tensor], failures: dict[str, tuple]
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Raw fbank (T, F) float32 and valid frame count of every decoded clip, from one batched call."""
    keys = list(waves)
    if not keys:
        return {}, {}
    batch = audio.fbank_batch([waves[key] for key in keys], job.audio)
    features: dict[str, torch.Tensor] = {}
    frames: dict[str, int] = {}
    for position, key in enumerate(keys):
        if not bool(torch.isfinite(batch[position]).all()):
            failures[key] = (FEATURES_STAGE, "non_finite_features", "fbank produced NaN/inf values")
            continue
        features[key] = batch[position]
        frames[key] = min(audio.frame_count(waves[key].numel(), job.audio), job.audio.target_length)
    return features, frames


def _assemble_groups(job: ShardJob, valid: list[str], stats: Counter) -> list[_Group]:
    """The shard's groups with failed slots replaced by filler clips; groups without a valid primary are dropped.

    Fillers are the shard's valid clips (plan order) not already in the group, taken in turn, so the choice
    depends only on the plan and on which clips failed. With too few distinct clips a group may repeat one.
    """
    available = set(valid)
    groups: list[_Group] = []
    turn = 0
    for sample, slots in groupby(job.rows, key=lambda row: row["sample"]):
        slots = sorted(slots, key=lambda row: row["slot"])
        if not any(not row["filler"] and row["key"] in available for row in slots):
            stats["groups_dropped"] += 1
            continue
        keys = [row["key"] if row["key"] in available else None for row in slots]
        filler = [bool(row["filler"]) or row["key"] not in available for row in slots]
        for position, key in enumerate(keys):
            if key is not None:
                continue
            taken = {k for k in keys if k is not None}
            candidates = [k for k in valid if k not in taken] or valid
            keys[position] = candidates[turn % len(candidates)]
            turn += 1
            stats["fillers_substituted"] += 1
        windows = [(int(row["i1"]), int(row["i2"])) for row in slots]
        groups.append(_Group(int(sample), keys, filler, windows))
    return groups


def _mixtures(
    job: ShardJob,
    groups: list[_Group],
    features: dict[str, torch.Tensor],
    frames: dict[str, int],
    waves: dict[str, torch.Tensor],
) -> list[torch.Tensor | None]:
    """(G, T, F) float32 mixtures per group (mixture i has primary i, partner i - 1), or None when not materialised."""
    if not job.mixing.materialize_mixtures:
        return [None] * len(groups)
    time_patches = job.audio.target_length // job.patch_size
    r = job.nomix_rows
    if job.mixing.domain == "logmel_max":
        result: list[torch.Tensor | None] = []
        for group in groups:
            size = len(group.keys)
            clean = torch.stack([features[key] for key in group.keys])
            masks = [mixing.nomix_mask(i1, i2, r, time_patches) for i1, i2 in group.windows]
            nomix = torch.from_numpy(np.stack(masks))
            partner = torch.tensor([(i - 1) % size for i in range(size)], dtype=torch.long)
            valid_frames = torch.tensor([frames[key] for key in group.keys], dtype=torch.long)
            result.append(
                mixing.logmel_max_batch(clean, partner, nomix, job.patch_size, job.mixing.mix_padding, valid_frames)
            )
        return result
    sums = []
    for group in groups:
        size = len(group.keys)
        for i, (i1, i2) in enumerate(group.windows):
            primary, foreign = waves[group.keys[i]], waves[group.keys[(i - 1) % size]]
            windows = mixing.window_ranges(i1, i2, r)
            gain = job.mixing.waveform_gain
            sums.append(mixing.waveform_sum_mixture(primary, foreign, windows, gain, job.audio, job.patch_size))
    spectra = audio.fbank_batch(sums, job.audio) if sums else None
    result = []
    offset = 0
    for group in groups:
        result.append(spectra[offset : offset + len(group.keys)])
        offset += len(group.keys)
    return result


def _feature_sums(values: torch.Tensor) -> tuple[float, float, int]:
    as_double = values.double()
    return float(as_double.sum()), float((as_double * as_double).sum()), int(as_double.numel())


def _build_samples(job: ShardJob) -> tuple[list[tuple[str, dict[str, bytes]]], list[dict], Counter, list[float]]:
    """(samples, quarantine rows, counters, [sum, sum of squares, count] of the primaries' features)."""
    split, epoch, shard = plan.parse_shard_name(job.name)
    clips: dict[str, dict] = {}
    for row in job.rows:
        clips.setdefault(row["key"], row)
    stats: Counter = Counter(clips_planned=len(clips))
    waves, failures = _decode_clips(job, clips)
    features, frames = _features(job, waves, failures)
    stats["clips_decoded"] = len(features)
    stats["audio_seconds"] = sum(waves[key].numel() for key in features) / job.audio.sample_rate
    valid = [key for key in clips if key in features]
    # A failed clip is quarantined by the shard where it is a primary (once per mixture epoch).
    quarantine = []
    for key, (stage, reason, detail) in failures.items():
        if any(row["key"] == key and not row["filler"] for row in job.rows):
            quarantine.append(_quarantine_row(job, clips[key], stage, reason, detail))
        else:
            stats["failed_fillers"] += 1
    moments = [0.0, 0.0, 0]

    samples: list[tuple[str, dict[str, bytes]]] = []
    if not job.mix:
        for row in job.rows:
            if row["key"] not in features:
                continue
            key = row["key"]
            members = shards.encode_eval_sample(features[key], key, row["label_indices"], frames[key])
            samples.append((plan.sample_key(split, epoch, shard, int(row["sample"])), members))
            moments = [a + b for a, b in zip(moments, _feature_sums(features[key]))]
            stats["primaries"] += 1
        return samples, quarantine, stats, moments

    labels = {key: row["label_indices"] for key, row in clips.items()}
    groups = _assemble_groups(job, valid, stats)
    for group, mixed in zip(groups, _mixtures(job, groups, features, frames, waves)):
        members = shards.encode_sample(
            clips=[features[key] for key in group.keys],
            clip_keys=group.keys,
            labels=[labels[key] for key in group.keys],
            filler=group.filler,
            windows=group.windows,
            rows=job.nomix_rows,
            domain=job.mixing.domain,
            seed=job.seed,
            mixtures=list(mixed) if mixed is not None else None,
            frames=[frames[key] for key in group.keys],
        )
        samples.append((plan.sample_key(split, epoch, shard, group.sample), members))
        for key, is_filler in zip(group.keys, group.filler):
            stats["fillers" if is_filler else "primaries"] += 1
            if not is_filler:
                moments = [a + b for a, b in zip(moments, _feature_sums(features[key]))]
    return samples, quarantine, stats, moments


def records_directory(output: str) -> str:
    return f"{output.rstrip('/')}/{RECORDS_DIR}" if "://" in output else os.path.join(output, RECORDS_DIR)


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


def _shard_sources(job: ShardJob) -> dict[str, list | None]:
    """{clip key: source_state} of every clip the shard reads, taken before decoding (a later change then shows)."""
    paths = {row["key"]: row["path"] for row in job.rows}
    return {key: source_state(path, job.hash_sources) for key, path in sorted(paths.items())}


def process_shard(job: ShardJob) -> dict:
    """Build, publish and record one shard; returns its record (index rows, quarantine rows, stats), no arrays."""
    started = time.perf_counter()
    _inject_test_faults(job.name)
    sources = _shard_sources(job)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples, quarantine, stats, moments = _build_samples(job)
    finally:
        torch.set_num_threads(threads)
    size, digest = shards.write_shard(samples, job.output, job.name)
    stats["samples"] = len(samples)
    stats["seconds"] = time.perf_counter() - started
    record = {
        "format": RECORD_FORMAT,
        "shard": job.name,
        "fingerprint": job.fingerprint,
        "bytes": size,
        "sha256": digest,
        "index": shards.index_rows(job.name, samples, job.fingerprint),
        "quarantine": quarantine,
        "feature_moments": moments,
        "stats": dict(stats),
        "sources": sources,
    }
    payload = json.dumps(record, sort_keys=True).encode("utf-8")
    shards.publish_bytes(payload, records_directory(job.output), record_name(job.name), done_marker=False)
    return record


@ray.remote(max_retries=3, retry_exceptions=False)
def process_shard_task(job: ShardJob) -> dict:
    """`process_shard` as a Ray task; the result also names the node that ran it (not stored in the record)."""
    return {**process_shard(job), "node": ray.get_runtime_context().get_node_id()}


# ---------------------------------------------------------------------------------------------------------
# Driver helpers: records, tables, ledger, dataset.json


def _read_optional(location: shards.Location, relative: str) -> bytes | None:
    path = location.join(relative)
    try:
        if location.filesystem is None:
            with open(path, "rb") as handle:
                return handle.read()
        with location.filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (FileNotFoundError, OSError):
        return None


def _compact(record: dict) -> dict:
    """A record as the driver keeps it: its index rows as an Arrow table (far smaller than dicts at scale)."""
    return {**record, "index": shards.index_table(record["index"])}


def finished_record(location: shards.Location, name: str, fingerprint: str, rehash: bool = False) -> dict | None:
    """The record of a shard a previous run finished with this fingerprint, or None. A local shard must have the
    recorded size (and, with `rehash`, the recorded sha256); a remote one a done-marker holding the sha256.
    The source files are compared separately (`changed_sources`)."""
    raw = _read_optional(location, f"{RECORDS_DIR}/{record_name(name)}")
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if record.get("format") != RECORD_FORMAT or record.get("fingerprint") != fingerprint or record.get("shard") != name:
        return None
    local = location.filesystem is None
    checksum = record.get("sha256") if rehash or not local else None
    if not shards.is_published(location.directory, name, checksum, filesystem=location.filesystem,
                               size=record.get("bytes", -1) if local else None):
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


def _sub_location(output: str, location: shards.Location) -> str:
    """What a task passes to shards.* to reach the output: the absolute local directory or the URL."""
    return location.directory if location.filesystem is None else output


def quarantine_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def check_ledger(manifest: pa.Table, index: pa.Table, quarantine: pa.Table, mixture_epochs: int) -> dict:
    """Per split and mixture epoch: manifest rows = primaries written + clips quarantined, each exactly once.

    Returns {split: {epoch: {"manifest", "primaries", "fillers", "quarantined"}}}; raises LedgerError naming
    every difference (missing keys, keys counted twice, keys not in the manifest).
    """
    manifest_keys: dict[str, Counter] = {}
    mix_of: dict[str, bool] = {}
    for key, split, mix in zip(
        manifest.column("key").to_pylist(), manifest.column("split").to_pylist(), manifest.column("mix").to_pylist()
    ):
        manifest_keys.setdefault(split, Counter())[key] += 1
        mix_of[split] = mix
    written: dict[tuple[str, int], Counter] = {}
    fillers: Counter = Counter()
    for split, epoch, clips, filler in zip(
        index.column("split").to_pylist(),
        index.column("epoch").to_pylist(),
        index.column("clips").to_pylist(),
        index.column("filler").to_pylist(),
    ):
        for key, is_filler in zip(clips, filler):
            if is_filler:
                fillers[(split, epoch)] += 1
            else:
                written.setdefault((split, epoch), Counter())[key] += 1
    quarantined: dict[tuple[str, int], Counter] = {}
    for key, split, stage, epoch in zip(
        quarantine.column("key").to_pylist(),
        quarantine.column("split").to_pylist(),
        quarantine.column("stage").to_pylist(),
        quarantine.column("epoch").to_pylist(),
    ):
        if stage != MANIFEST_STAGE:
            quarantined.setdefault((split, epoch), Counter())[key] += 1

    report: dict[str, dict[str, dict[str, int]]] = {}
    problems: list[str] = []
    unexpected_splits = {split for split, _ in list(written) + list(quarantined)} - set(manifest_keys)
    for split in sorted(unexpected_splits):
        problems.append(f"split {split!r} is written or quarantined but not in the manifest")
    for split, expected in sorted(manifest_keys.items()):
        epochs = range(mixture_epochs) if mix_of[split] else range(1)
        report[split] = {}
        for epoch in epochs:
            primaries = written.get((split, epoch), Counter())
            failed = quarantined.get((split, epoch), Counter())
            accounted = primaries + failed
            report[split][str(epoch)] = {
                "manifest": sum(expected.values()),
                "primaries": sum(primaries.values()),
                "fillers": fillers[(split, epoch)],
                "quarantined": sum(failed.values()),
            }
            missing = sorted(set(expected) - set(accounted))
            extra = sorted(set(accounted) - set(expected))
            twice = sorted(key for key, count in accounted.items() if key in expected and count > expected[key])
            where = f"{split} mixture epoch {epoch}" if mix_of[split] else split
            for label, keys in (("missing", missing), ("not in the manifest", extra), ("counted twice", twice)):
                if keys:
                    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                    problems.append(f"{where}: {len(keys)} clips {label}: {shown}")
    if problems:
        raise LedgerError("ledger mismatch: " + "; ".join(problems))
    return report


def _class_list(manifest: pa.Table) -> list[dict]:
    return [{"index": c.index, "mid": c.mid, "name": c.display_name} for c in manifest_classes(manifest)]


def _dataset_info(
    *,
    data: DataConfig,
    patch_size: int,
    resolved_config: dict,
    manifest: pa.Table,
    plan_table: pa.Table,
    fingerprint: str,
    inputs: dict[str, Any],
    rows: int,
    names: list[str],
    records: dict[str, dict],
    ledger: dict,
    coverage: dict,
) -> dict:
    """The contents of dataset.json (no timestamps: equal inputs give equal files).

    Per split: `mix`, `shards_per_epoch` {"0": [names], ...}, `samples_per_epoch`, `samples` (the smallest
    epoch's count: dropped groups can make epochs differ), `clips` (manifest rows), `ledger`, `bytes`.
    """
    splits: dict[str, dict] = {}
    mix_of = dict(zip(manifest.column("split").to_pylist(), manifest.column("mix").to_pylist()))
    for name in names:
        split, epoch, _ = plan.parse_shard_name(name)
        entry = splits.setdefault(split, {"mix": bool(mix_of[split]), "shards_per_epoch": {}, "samples_per_epoch": {}})
        entry["shards_per_epoch"].setdefault(str(epoch), []).append(name)
        per_epoch = entry["samples_per_epoch"]
        per_epoch[str(epoch)] = per_epoch.get(str(epoch), 0) + records[name]["index"].num_rows
    for split, entry in splits.items():
        entry["samples"] = min(entry["samples_per_epoch"].values())
        entry["clips"] = ledger[split]["0"]["manifest"]
        entry["ledger"] = ledger[split]
        entry["bytes"] = sum(records[name]["bytes"] for names_ in entry["shards_per_epoch"].values() for name in names_)
    moments = np.zeros(3)
    mix_splits = {split for split, entry in splits.items() if entry["mix"]} or set(splits)
    for name in names:
        split, epoch, _ = plan.parse_shard_name(name)
        if split in mix_splits and epoch == 0:
            moments += np.asarray(records[name]["feature_moments"], dtype=np.float64)
    total, total_sq, count = moments
    mean = total / count if count else 0.0
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0))) if count else 0.0
    return {
        "format": FORMAT_VERSION,
        "name": resolved_config.get("name", ""),
        "fingerprint": fingerprint,
        "fingerprint_inputs": inputs,
        "plan_fingerprint": plan.plan_fingerprint(plan_table),
        "sample_rate": data.audio.sample_rate,
        "mel_bins": data.audio.mel_bins,
        "target_length": data.audio.target_length,
        "frame_shift_ms": data.audio.frame_shift_ms,
        "frame_length_ms": data.audio.frame_length_ms,
        "patch_size": patch_size,
        "time_patches": data.audio.target_length // patch_size,
        "group_size": data.mixing.group_size,
        "r": rows,
        "mixture_epochs": data.mixing.mixture_epochs,
        "materialize_mixtures": data.mixing.materialize_mixtures,
        "domain": data.mixing.domain,
        "waveform_gain": data.mixing.waveform_gain,
        "mix_padding": data.mixing.mix_padding,
        "seed": data.shards.seed,
        "features": feature_parameters(data.audio, patch_size),
        "feature_stats": {
            "mean": mean,
            "std": std,
            "values": int(count),
            "over": "every T x F value of the primary clips of mixture epoch 0 (mix splits), padding included",
        },
        "classes": _class_list(manifest),
        "class_coverage": coverage,
        "splits": dict(sorted(splits.items())),
        "checksums": {name: records[name]["sha256"] for name in names},
        "bytes": sum(records[name]["bytes"] for name in names),
        "plan": plan.plan_metadata(plan_table),
        "config": resolved_config,
    }


def _quarantine_summary(quarantine: pa.Table) -> dict[str, dict[str, int]]:
    """Manifest-stage rows per reason, and distinct quarantined clips per reason for the later stages."""
    seen: dict[tuple[str, str], set] = {}
    rows: Counter = Counter()
    for key, split, path, stage, reason in zip(
        *(quarantine.column(name).to_pylist() for name in ("key", "split", "path", "stage", "reason"))
    ):
        rows[(stage, reason)] += 1
        seen.setdefault((stage, reason), set()).add((split, key, path))
    summary: dict[str, dict[str, int]] = {}
    for (stage, reason), count in sorted(rows.items()):
        summary.setdefault(stage, {})[reason] = count if stage == MANIFEST_STAGE else len(seen[(stage, reason)])
    return summary


def class_coverage(manifest: pa.Table, quarantine: pa.Table, max_loss_share: float) -> dict:
    """Clips per class before and after quarantine, per split, and a warning for every class that loses more
    than `max_loss_share` of them.

    "before" counts the split's clips carrying the class: its manifest clips and the clips the manifest stage
    quarantined with their CSV labels (a missing file, an unknown label, ...; not a duplicate_key row, whose
    key is kept or counted by its other row). "after" counts those of the manifest clips that no later stage
    (decode, features) quarantined in any mixture epoch; "lost" the lost clips per quarantine reason. Classes of
    the class list without a clip in any split, before quarantine, are listed under "absent".
    """
    classes = manifest_classes(manifest)
    lookup = {label.display_name: label.index for label in classes} | {label.mid: label.index for label in classes}
    failed: dict[tuple[str, str], str] = {}
    labelled: dict[tuple[str, str], tuple[str, list[int]]] = {}  # manifest-stage losses with known labels
    # quarantine.parquet of an earlier version has no labels column.
    labels_column = quarantine.column("labels").to_pylist() if "labels" in quarantine.column_names else None
    for key, split, stage, reason, labels in zip(
        *(quarantine.column(name).to_pylist() for name in ("key", "split", "stage", "reason")),
        labels_column or [None] * quarantine.num_rows,
    ):
        if stage != MANIFEST_STAGE:
            failed.setdefault((split, key), reason)
        elif labels and split is not None and key is not None and reason != "duplicate_key":
            indices = list(dict.fromkeys(lookup[label] for label in labels if label in lookup))
            labelled.setdefault((split, key), (reason, indices))
    counts: dict[str, dict[int, dict]] = {}

    def count(split: str, indices: list[int], reason: str | None) -> None:
        for index in indices:
            entry = counts.setdefault(split, {}).setdefault(index, {"before": 0, "after": 0, "lost": Counter()})
            entry["before"] += 1
            if reason is None:
                entry["after"] += 1
            else:
                entry["lost"][reason] += 1

    for key, split, indices in zip(*(manifest.column(name).to_pylist() for name in ("key", "split", "label_indices"))):
        count(split, indices, failed.get((split, key)))
    for (split, _), (reason, indices) in labelled.items():
        count(split, indices, reason)
    splits: dict[str, list[dict]] = {}
    warnings: list[str] = []
    for split in sorted(counts):
        rows = splits.setdefault(split, [])
        for index, entry in sorted(counts[split].items()):
            lost = dict(sorted(entry["lost"].items()))
            rows.append({"index": index, "name": classes[index].display_name, "before": entry["before"],
                         "after": entry["after"], "lost": lost})
            share = 1.0 - entry["after"] / entry["before"]
            if share > max_loss_share:
                reasons = ", ".join(f"{reason} {n}" for reason, n in lost.items())
                warnings.append(
                    f"class {classes[index].display_name!r} of split {split!r} lost {entry['before'] - entry['after']} "
                    f"of its {entry['before']} clips ({share:.0%}) to quarantine: {reasons}"
                )
    present = {index for per_split in counts.values() for index in per_split}
    absent = [label.display_name for label in classes if label.index not in present]
    return {"warn_loss_share": max_loss_share, "splits": splits, "warnings": warnings, "absent": absent}


def _named(names: list[str]) -> str:
    return ", ".join(names[:PROBLEMS_NAMED]) + (", ..." if len(names) > PROBLEMS_NAMED else "")


def coverage_lines(coverage: dict, width: int = 14) -> list[str]:
    """Text lines of a `class_coverage` record (the summary and `sslam inspect` print them, their line titles
    `width` wide); at most PROBLEMS_NAMED names or warnings a line kind, the rest are in dataset.json."""
    classes, warning = "classes".ljust(width), "WARNING".ljust(width)
    lines = []
    for split, rows in coverage["splits"].items():
        before, after = sum(row["before"] for row in rows), sum(row["after"] for row in rows)
        emptied = [row["name"] for row in rows if row["after"] == 0]
        lines.append(
            f"{classes}{split}: {len(rows)} classes, {before} -> {after} clips per class (summed) after "
            f"quarantine, {len(emptied)} classes left without clips{': ' + _named(emptied) if emptied else ''}"
        )
        losing = sorted((row for row in rows if row["after"] < row["before"]),
                        key=lambda row: (row["after"] / row["before"], row["index"]))
        if losing:
            lines.append("  most lost: " + _named([f"{row['name']} {row['before']}->{row['after']}" for row in losing]))
    if coverage["absent"]:
        names = coverage["absent"]
        lines.append(f"{classes}{len(names)} classes of the class list have no clip in any split: {_named(names)}")
    share, warnings = coverage["warn_loss_share"], coverage["warnings"]
    lines += [f"{warning}{text} (more than {share:.0%})" for text in warnings[:PROBLEMS_NAMED]]
    if len(warnings) > PROBLEMS_NAMED:
        more = len(warnings) - PROBLEMS_NAMED
        lines.append(f"{warning}... and {more} more classes (dataset.json class_coverage)")
    return lines


def format_summary(summary: dict) -> str:
    """The operator's end-of-run summary, a few lines of text."""
    lines = [
        f"output        {summary['output']}",
        f"fingerprint   {summary['fingerprint']}",
    ]
    if summary.get("nothing_to_do"):
        lines.append("nothing to do: every shard is published with this fingerprint, dataset.json is up to date")
    shards_line = summary["shards"]
    lines += [
        f"shards        {shards_line['total']} ({shards_line['written']} written now, {shards_line['skipped']} kept, "
        f"{shards_line.get('changed_sources', 0)} rebuilt for changed source files)",
        f"clips         {summary['clips']} in the manifest, {summary['primaries']} primaries written "
        f"over all mixture epochs, {summary['fillers']} filler slots",
        f"samples       {summary['samples']} ({summary['bytes'] / 2**20:.1f} MiB)",
        f"throughput    {summary['clips_per_s']:.1f} clips/s decoded "
        f"({summary['clips_decoded']} clips in {summary['task_seconds']:.1f} s, {summary['cpus']:g} CPUs, "
        f"{summary['nodes']} nodes ran tasks)",
    ]
    for stage, reasons in summary["quarantined"].items():
        detail = ", ".join(f"{reason}: {count}" for reason, count in reasons.items())
        lines.append(f"quarantined   {stage}: {detail}")
    for split, epochs in summary["ledger"].items():
        for epoch, counts in epochs.items():
            lines.append(
                f"ledger        {split} e{int(epoch):02d}: {counts['manifest']} = {counts['primaries']} written "
                f"+ {counts['quarantined']} quarantined ({counts['fillers']} fillers)"
            )
    if "class_coverage" in summary:
        lines += coverage_lines(summary["class_coverage"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Driver


def _run_tasks(
    jobs: Iterator[ShardJob], count: int, max_in_flight: int, progress: bool, already_done: int
) -> tuple[dict, dict, set]:
    """Run `count` tasks, at most max_in_flight at a time; (records by shard, errors by shard, node ids used)."""
    records: dict[str, dict] = {}
    nodes: set = set()
    errors: dict[str, str] = {}
    in_flight: dict[ray.ObjectRef, str] = {}
    clips = 0
    started = time.perf_counter()
    bar = tqdm(
        total=count + already_done, initial=already_done, unit="shard", disable=not progress, mininterval=1.0
    )
    try:
        submitted = 0
        while submitted < count or in_flight:
            while submitted < count and len(in_flight) < max_in_flight:
                job = next(jobs)
                in_flight[process_shard_task.remote(job)] = job.name
                submitted += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for reference in ready:
                name = in_flight.pop(reference)
                try:
                    record = ray.get(reference)
                except ray.exceptions.RayError as error:
                    errors[name] = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
                    logger.error("shard %s failed: %s", name, error)
                    continue
                nodes.add(record.pop("node", None))
                records[name] = _compact(record)
                clips += record["stats"].get("clips_decoded", 0)
                bar.set_postfix(clips_per_s=f"{clips / max(time.perf_counter() - started, 1e-9):.1f}")
                bar.update(1)
    finally:
        bar.close()
    return records, errors, nodes


@dataclass(frozen=True)
class _Plan:
    """What the driver decides before any decoding."""

    manifest: pa.Table
    manifest_quarantine: pa.Table
    table: pa.Table
    fingerprint: str  # of the dataset: plan + features + mixing
    inputs: dict[str, Any]  # what decides the fingerprint (fingerprint_inputs)
    slices: list[tuple[str, pa.Table]]  # (shard name, its plan rows), plan order
    rows: int  # r

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.slices]


def _make_plan(data: DataConfig, patch_size: int) -> _Plan:
    time_patches = data.audio.target_length // patch_size
    try:
        manifest, manifest_quarantine = build_manifest(data.source)
        table = plan.make_plan(manifest, data.mixing, data.shards, time_patches, data.shards.seed)
    except (ManifestError, ValueError, OSError) as error:
        raise PreprocessConfigError(f"cannot plan the dataset: {error}") from error
    if table.num_rows == 0:
        raise PreprocessConfigError("the manifest holds no clips: nothing to preprocess")
    fingerprint = dataset_fingerprint(plan.plan_fingerprint(table), data.audio, data.mixing, patch_size)
    inputs = fingerprint_inputs(data, patch_size, manifest, table)
    rows = mixing.nomix_rows(time_patches, data.mixing.nomix_rows)
    return _Plan(manifest, manifest_quarantine, table, fingerprint, inputs, plan.shard_tasks(table), rows)


def held_fingerprint(location: shards.Location) -> tuple[str, dict | None] | None:
    """(fingerprint, its inputs or None) of the set an output holds: fingerprint.json, else an older dataset.json."""
    for name in (FINGERPRINT_RECORD, DATASET_INFO):
        raw = _read_optional(location, name)
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
    shard = name[: -len(shards.DONE_SUFFIX)] if name.endswith(shards.DONE_SUFFIX) else name
    return bool(plan.SHARD_NAME.fullmatch(shard) or shards.TEMPORARY.fullmatch(name))


def remove_shard_set(location: shards.Location) -> int:
    """Remove every file of the shard set in `location`; returns how many. dataset.json goes first (no reader
    takes a half-removed set for a set), fingerprint.json last (an interrupted removal is still refused
    without --overwrite). Other files, and the lock, stay."""
    records = shards.Location(location.join(RECORDS_DIR), location.filesystem)
    present = set(shards.list_files(location))
    doomed = [name for name in (DATASET_INFO, INDEX_TABLE, QUARANTINE_TABLE) if name in present]
    doomed += sorted(name for name in present if _is_set_file(name))
    removed = 0
    for name in doomed:
        shards.remove_file(location, name)
        removed += 1
    for name in shards.list_files(records):
        if name.endswith(".json") or shards.TEMPORARY.fullmatch(name):
            shards.remove_file(records, name)
            removed += 1
    for name in (MANIFEST_TABLE, PLAN_TABLE, FINGERPRINT_RECORD):
        if name in present:
            shards.remove_file(location, name)
            removed += 1
    return removed


def _claim_output(location: shards.Location, output: str, planned: _Plan, overwrite: bool) -> None:
    """Refuse an output that holds another plan's set (or remove it, with `overwrite`); then record this plan."""
    held = held_fingerprint(location)
    if overwrite:
        removed = remove_shard_set(location)
        logger.warning("--overwrite: removed the %d files of the shard set in %s", removed, output)
        held = None
    elif held is not None and held[0] != planned.fingerprint:
        differences = fingerprint_differences(held[1], planned.inputs)
        raise FingerprintMismatchError(output, held[0], planned.fingerprint, differences)
    if held is None or _read_optional(location, FINGERPRINT_RECORD) is None:
        payload = json.dumps({"fingerprint": planned.fingerprint, "inputs": planned.inputs}, indent=2, sort_keys=True)
        directory, filesystem = location.directory, location.filesystem
        shards.publish_bytes(payload.encode("utf-8"), directory, FINGERPRINT_RECORD, False, filesystem)


def _unchanged_records(
    planned: _Plan, records: dict[str, dict], with_hash: bool
) -> tuple[dict[str, dict], list[str]]:
    """(records whose source files are as they recorded them, names of the others: built again)."""
    paths: dict[str, dict[str, str]] = {}
    for name, piece in planned.slices:
        if name in records:
            paths[name] = dict(zip(piece.column("key").to_pylist(), piece.column("path").to_pylist()))
    distinct = sorted({path for keyed in paths.values() for path in keyed.values()})
    with ThreadPoolExecutor(max_workers=SOURCE_STAT_WORKERS) as pool:
        states = dict(zip(distinct, pool.map(lambda path: source_state(path, with_hash), distinct)))
    kept, changed = {}, []
    for name, record in records.items():
        current = {key: states[path] for key, path in paths[name].items()}
        keys = changed_sources(record.get("sources") or {}, current, with_hash)
        if keys:
            logger.info("%s: %d source files changed since it was written (e.g. %s): building it again",
                        name, len(keys), keys[0])
            changed.append(name)
        else:
            kept[name] = record
    return kept, changed


def _is_up_to_date(location: shards.Location, fingerprint: str) -> bool:
    """dataset.json has this fingerprint and the tables exist (the shards are checked separately)."""
    info = _read_optional(location, DATASET_INFO)
    return (
        info is not None
        and json.loads(info).get("fingerprint") == fingerprint
        and _read_optional(location, INDEX_TABLE) is not None
        and _read_optional(location, QUARANTINE_TABLE) is not None
    )


def _shard_jobs(
    planned: _Plan, pending: list[tuple[str, pa.Table]], data: DataConfig, patch_size: int, output: str
) -> Iterator[ShardJob]:
    """The tasks' inputs, made as they are submitted (plan rows become dicts only then)."""
    mix_of = dict(zip(planned.manifest.column("split").to_pylist(), planned.manifest.column("mix").to_pylist()))
    return (
        ShardJob(
            name=name,
            mix=bool(mix_of[plan.parse_shard_name(name)[0]]),
            rows=piece.to_pylist(),
            output=output,
            audio=data.audio,
            mixing=data.mixing,
            patch_size=patch_size,
            nomix_rows=planned.rows,
            seed=data.shards.seed,
            fingerprint=planned.fingerprint,
            hash_sources=data.shards.hash_sources_on_resume,
        )
        for name, piece in pending
    )


def _write_tables(location: shards.Location, planned: _Plan, records: dict[str, dict]) -> None:
    """index.parquet and quarantine.parquet (manifest-stage rows first), both in plan order."""
    quarantine_rows = [{**row, "epoch": None, "shard": None} for row in planned.manifest_quarantine.to_pylist()]
    quarantine_rows += [row for name in planned.names for row in records[name]["quarantine"]]
    index = pa.concat_tables([records[name]["index"] for name in planned.names])
    shards.write_table(index, location.directory, INDEX_TABLE, location.filesystem)
    shards.write_table(quarantine_table(quarantine_rows), location.directory, QUARANTINE_TABLE, location.filesystem)


def _role_counts(index: pa.Table) -> tuple[int, int]:
    """(primaries, fillers) over every sample of an index table."""
    flags = index.column("filler").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(bool)
    return int((~flags).sum()), int(flags.sum())


def run_pipeline(
    data: DataConfig,
    patch_size: int,
    resolved_config: dict | None = None,
    *,
    progress: bool = True,
    max_in_flight: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Run the whole preprocessing job on the connected Ray cluster; returns the summary.

    Without a connection it connects to RAY_ADDRESS, else starts a new local Ray. Raises
    OutputLockedError (another run holds the output; nothing touched), PreprocessConfigError (bad config or
    input, nothing run; FingerprintMismatchError: the output holds another plan's set and `overwrite` is
    false), PreprocessError (shards failed after retries; the published ones are kept for a re-run) or
    LedgerError (the written output does not account for every clip; dataset.json is then not written).
    """
    check_config(data, patch_size)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    check_output_location(data.shards.output)
    location = shards.locate(data.shards.output)
    with OutputLock(location) as lock:
        return _run_locked(data, patch_size, resolved_config, location, lock, progress, max_in_flight, overwrite)


def _run_locked(
    data: DataConfig,
    patch_size: int,
    resolved_config: dict | None,
    location: shards.Location,
    lock: OutputLock,
    progress: bool,
    max_in_flight: int | None,
    overwrite: bool,
) -> dict:
    started = time.perf_counter()
    output = data.shards.output
    planned = _make_plan(data, patch_size)
    _claim_output(location, output, planned, overwrite)
    names = planned.names
    logger.info(
        "plan: %d clips, %d shards, fingerprint %s, output %s",
        planned.manifest.num_rows, len(names), planned.fingerprint[:12], output,
    )

    rehash = data.shards.verify_checksums_on_resume
    found = {name: finished_record(location, name, planned.fingerprint, rehash) for name in names}
    found = {name: record for name, record in found.items() if record is not None}
    kept, changed = _unchanged_records(planned, found, data.shards.hash_sources_on_resume)
    records = {name: _compact(record) for name, record in kept.items()}
    pending = [(name, piece) for name, piece in planned.slices if name not in records]
    up_to_date = not pending and _is_up_to_date(location, planned.fingerprint)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    run_records: dict[str, dict] = {}
    nodes: set = set()
    task_seconds = 0.0
    if up_to_date:
        logger.info(
            "nothing to do: all %d shards of fingerprint %s are published", len(names), planned.fingerprint[:12]
        )
    else:
        if records:
            logger.info(
                "resuming: %d of %d shards are already published, %d to go", len(records), len(names), len(pending)
            )
        if _read_optional(location, DATASET_INFO) is not None:
            # A reader sees a whole set or none: never the old dataset.json over shards being rewritten.
            shards.remove_file(location, DATASET_INFO)
        shards.write_table(planned.manifest, location.directory, MANIFEST_TABLE, location.filesystem)
        shards.write_table(planned.table, location.directory, PLAN_TABLE, location.filesystem)
        shards.remove_stale_temporaries(location.directory, location.filesystem)
        shards.remove_stale_temporaries(location.join(RECORDS_DIR), location.filesystem)
        jobs = _shard_jobs(planned, pending, data, patch_size, _sub_location(output, location))
        tasks_started = time.perf_counter()
        in_flight = max_in_flight or max(1, int(2 * cpus))
        run_records, errors, nodes = _run_tasks(jobs, len(pending), in_flight, progress, len(records))
        task_seconds = time.perf_counter() - tasks_started
        records.update(run_records)
        shards.remove_stale_temporaries(location.directory, location.filesystem)
        if errors:
            listed = "; ".join(f"{name}: {error}" for name, error in sorted(errors.items())[:5])
            raise PreprocessError(
                f"{len(errors)} of {len(names)} shards failed after retries ({listed}); the {len(records)} "
                "published shards are kept: fix the cause and run the job again to finish"
            )
        _write_tables(location, planned, records)

    # The ledger reads back what was written, not what is in memory.
    written_index = shards.read_table(location.directory, INDEX_TABLE, location.filesystem)
    written_quarantine = shards.read_table(location.directory, QUARANTINE_TABLE, location.filesystem)
    ledger = check_ledger(planned.manifest, written_index, written_quarantine, data.mixing.mixture_epochs)
    coverage = class_coverage(planned.manifest, written_quarantine, data.shards.warn_class_loss_share)
    for warning in coverage["warnings"]:
        logger.warning("%s", warning)
    if not up_to_date:
        lock.check()
        info = _dataset_info(
            data=data,
            patch_size=patch_size,
            resolved_config=resolved_config or {"data": dataclasses.asdict(data)},
            manifest=planned.manifest,
            plan_table=planned.table,
            fingerprint=planned.fingerprint,
            inputs=planned.inputs,
            rows=planned.rows,
            names=names,
            records=records,
            ledger=ledger,
            coverage=coverage,
        )
        payload = json.dumps(info, indent=2).encode("utf-8")
        shards.publish_bytes(payload, location.directory, DATASET_INFO, False, location.filesystem)

    primaries, fillers = _role_counts(written_index)
    clips_decoded = sum(record["stats"].get("clips_decoded", 0) for record in run_records.values())
    summary = {
        "output": output,
        "fingerprint": planned.fingerprint,
        "nothing_to_do": up_to_date,
        "shards": {
            "total": len(names),
            "written": len(run_records),
            "skipped": len(names) - len(run_records),
            "changed_sources": len(changed),
        },
        "clips": planned.manifest.num_rows,
        "primaries": primaries,
        "fillers": fillers,
        "samples": written_index.num_rows,
        "bytes": sum(record["bytes"] for record in records.values()),
        "clips_decoded": clips_decoded,
        "task_seconds": task_seconds,
        "clips_per_s": clips_decoded / task_seconds if task_seconds > 0 else 0.0,
        "cpus": cpus,
        "nodes": len(nodes),
        "elapsed_s": time.perf_counter() - started,
        "quarantined": _quarantine_summary(written_quarantine),
        "ledger": ledger,
        "class_coverage": coverage,
    }
    logger.info(
        "preprocessing done in %.1f s: %d shards (%d written now), %d samples",
        summary["elapsed_s"], len(names), len(run_records), summary["samples"],
    )
    return summary
