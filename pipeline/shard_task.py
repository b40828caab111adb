"""One Ray task per output shard: its inputs (`ShardJob`), decoding, features, mixtures, the samples, and the
publication of the shard and its resume record.

`process_shard`: decode every distinct clip of the shard (`audio.load_waveform`), run the one batched
front-end (`audio.fbank_batch`) over them, form the mixtures (the `pipeline.mixers` mixer of data.mixing.domain, or
none when `materialize_mixtures` is false), encode the samples and publish the shard (`shards.write_shard`: visible under
its final name only when complete). A clip that fails becomes a quarantine row (stage `decode` with
`AudioError.reason`, or `features`); the slots it leaves in a group are completed with filler clips of the same
shard (recorded as `filler` in the sample json and the index); a group without any valid primary is dropped.
Per-clip errors never fail a task. Torch runs single-threaded inside a task, so a shard's bytes do not depend
on the worker's thread count.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from itertools import groupby

import ray
import torch

from pipeline import audio, mixing, plan, shards, storage
from pipeline.config import AudioConfig, MixingConfig
from pipeline.mixers import mixer
from pipeline.mixers.base import MixSettings, assemble_group
from pipeline.ledger import DECODE_STAGE, FEATURES_STAGE
from pipeline.shardset import RECORD_FORMAT, RECORDS_DIR, record_name, source_state

logger = logging.getLogger(__name__)


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
    inputs = []
    for group in groups:
        layout = [
            {"partner": partner, "nomix": mixing.window_ranges(i1, i2, job.nomix_rows)}
            for partner, (i1, i2) in zip(mixing.group_cycle(len(group.keys)), group.windows)
        ]
        clean = torch.stack([features[key] for key in group.keys])
        valid_frames = [frames[key] for key in group.keys]
        inputs.append(assemble_group(layout, clean, job.patch_size, valid_frames, [waves[key] for key in group.keys]))
    settings = MixSettings(job.patch_size, job.mixing.mix_padding, job.mixing.waveform_gain, job.audio)
    return mixer(job.mixing.domain).mix(inputs, settings)


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


def _shard_sources(job: ShardJob) -> dict[str, list | None]:
    """{clip key: source_state} of every clip the shard reads, taken before decoding (a later change then shows)."""
    paths = {row["key"]: row["path"] for row in job.rows}
    return {key: source_state(path, job.hash_sources) for key, path in sorted(paths.items())}


def process_shard(job: ShardJob) -> dict:
    """Build, publish and record one shard; returns its record (index rows, quarantine rows, stats), no arrays."""
    started = time.perf_counter()
    sources = _shard_sources(job)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples, quarantine, stats, moments = _build_samples(job)
    finally:
        torch.set_num_threads(threads)
    output = storage.locate(job.output)
    size, digest = shards.write_shard(samples, output, job.name)
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
    output.child(RECORDS_DIR).publish(record_name(job.name), payload, done_marker=False)
    return record


@ray.remote(max_retries=3, retry_exceptions=False)
def process_shard_task(job: ShardJob) -> dict:
    """`process_shard` as a Ray task; the result also names the node that ran it (not stored in the record)."""
    return {**process_shard(job), "node": ray.get_runtime_context().get_node_id()}
