"""The Ray preprocessing pipeline: manifest -> seeded plan -> one Ray task per output shard -> shard set + ledger.

Driver (`run_pipeline`): build the manifest, make the plan (on the driver, seeded: the plan alone decides
every shard's bytes, whatever the cluster size), skip the shards a previous run finished, remove stale
temporaries, then run one task per remaining shard and stream their results with `ray.wait`. At the end it
writes `index.parquet`, `quarantine.parquet` and `dataset.json`, reads the two tables back and checks the
ledger: per mixture epoch of a mix split, every manifest clip is written as a primary exactly once or
quarantined (evaluation splits: written or quarantined). The task is `pipeline.shard_task`, the layout of the
output folder and its resume records `pipeline.shardset`, the ledger and dataset.json `pipeline.ledger`.

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
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from tqdm import tqdm

from pipeline import mixing, plan, storage
from pipeline.config import DataConfig
from pipeline.ledger import check_ledger, class_coverage, dataset_info, quarantine_summary, quarantine_table
from pipeline.locking import OutputLock
from pipeline.clips import ManifestError
from pipeline.manifest import build_manifest
from pipeline.mixers import MIXERS
from pipeline.preprocess_errors import FingerprintMismatchError, PreprocessConfigError, PreprocessError
from pipeline.shard_task import ShardJob, process_shard_task
from pipeline.shardset import (
    DATASET_INFO,
    FINGERPRINT_RECORD,
    INDEX_TABLE,
    MANIFEST_TABLE,
    PLAN_TABLE,
    QUARANTINE_TABLE,
    RECORDS_DIR,
    changed_sources,
    compact_record,
    dataset_fingerprint,
    finished_record,
    fingerprint_differences,
    fingerprint_inputs,
    held_fingerprint,
    remove_shard_set,
    source_state,
    write_dataset_info,
)

logger = logging.getLogger(__name__)

SOURCE_STAT_WORKERS = 16


def check_config(data: DataConfig, patch_size: int) -> None:
    """Refuse settings the job cannot honour (raised before Ray or any file is touched)."""
    audio_cfg, mixing_cfg = data.audio, data.mixing
    if patch_size < 1 or audio_cfg.target_length % patch_size:
        raise PreprocessConfigError(
            f"data.audio.target_length ({audio_cfg.target_length}) must be a multiple of the patch size ({patch_size})"
        )
    if mixing_cfg.domain not in MIXERS:
        raise PreprocessConfigError(f"data.mixing.domain must be one of {tuple(MIXERS)}, got {mixing_cfg.domain!r}")
    if mixing_cfg.mix_padding not in mixing.MIX_PADDINGS:
        raise PreprocessConfigError(
            f"data.mixing.mix_padding must be one of {mixing.MIX_PADDINGS}, got {mixing_cfg.mix_padding!r}"
        )
    try:
        MIXERS[mixing_cfg.domain].check_config(mixing_cfg)
    except ValueError as error:
        raise PreprocessConfigError(str(error)) from None
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
                records[name] = compact_record(record)
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


def _sub_location(output: str, location: storage.Location) -> str:
    """What a task passes to `storage.locate` to reach the output: the absolute local directory or the URL."""
    return location.directory if location.is_local else output


def _claim_output(location: storage.Location, output: str, planned: _Plan, overwrite: bool) -> None:
    """Refuse an output that holds another plan's set (or remove it, with `overwrite`); then record this plan."""
    held = held_fingerprint(location)
    if overwrite:
        removed = remove_shard_set(location)
        logger.warning("--overwrite: removed the %d files of the shard set in %s", removed, output)
        held = None
    elif held is not None and held[0] != planned.fingerprint:
        differences = fingerprint_differences(held[1], planned.inputs)
        raise FingerprintMismatchError(output, held[0], planned.fingerprint, differences)
    if held is None or location.read_optional(FINGERPRINT_RECORD) is None:
        payload = json.dumps({"fingerprint": planned.fingerprint, "inputs": planned.inputs}, indent=2, sort_keys=True)
        location.publish(FINGERPRINT_RECORD, payload.encode("utf-8"), done_marker=False)


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


def _is_up_to_date(location: storage.Location, fingerprint: str) -> bool:
    """dataset.json has this fingerprint and the tables exist (the shards are checked separately)."""
    info = location.read_optional(DATASET_INFO)
    return (
        info is not None
        and json.loads(info).get("fingerprint") == fingerprint
        and location.read_optional(INDEX_TABLE) is not None
        and location.read_optional(QUARANTINE_TABLE) is not None
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


def _write_tables(location: storage.Location, planned: _Plan, records: dict[str, dict]) -> None:
    """index.parquet and quarantine.parquet (manifest-stage rows first), both in plan order."""
    quarantine_rows = [{**row, "epoch": None, "shard": None} for row in planned.manifest_quarantine.to_pylist()]
    quarantine_rows += [row for name in planned.names for row in records[name]["quarantine"]]
    index = pa.concat_tables([records[name]["index"] for name in planned.names])
    location.write_table(INDEX_TABLE, index)
    location.write_table(QUARANTINE_TABLE, quarantine_table(quarantine_rows))


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
    location = storage.locate(data.shards.output)
    with OutputLock(location) as lock:
        return _run_locked(data, patch_size, resolved_config, location, lock, progress, max_in_flight, overwrite)


def _run_locked(
    data: DataConfig,
    patch_size: int,
    resolved_config: dict | None,
    location: storage.Location,
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
    records = {name: compact_record(record) for name, record in kept.items()}
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
        if location.read_optional(DATASET_INFO) is not None:
            # A reader sees a whole set or none: never the old dataset.json over shards being rewritten.
            location.remove(DATASET_INFO)
        location.write_table(MANIFEST_TABLE, planned.manifest)
        location.write_table(PLAN_TABLE, planned.table)
        location.remove_stale()
        location.child(RECORDS_DIR).remove_stale()
        jobs = _shard_jobs(planned, pending, data, patch_size, _sub_location(output, location))
        tasks_started = time.perf_counter()
        in_flight = max_in_flight or max(1, int(2 * cpus))
        run_records, errors, nodes = _run_tasks(jobs, len(pending), in_flight, progress, len(records))
        task_seconds = time.perf_counter() - tasks_started
        records.update(run_records)
        location.remove_stale()
        if errors:
            listed = "; ".join(f"{name}: {error}" for name, error in sorted(errors.items())[:5])
            raise PreprocessError(
                f"{len(errors)} of {len(names)} shards failed after retries ({listed}); the {len(records)} "
                "published shards are kept: fix the cause and run the job again to finish"
            )
        _write_tables(location, planned, records)

    # The ledger reads back what was written, not what is in memory.
    written_index = location.read_table(INDEX_TABLE)
    written_quarantine = location.read_table(QUARANTINE_TABLE)
    ledger = check_ledger(planned.manifest, written_index, written_quarantine, data.mixing.mixture_epochs)
    coverage = class_coverage(planned.manifest, written_quarantine, data.shards.warn_class_loss_share)
    for warning in coverage["warnings"]:
        logger.warning("%s", warning)
    if not up_to_date:
        lock.check()
        info = dataset_info(
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
        write_dataset_info(location, info)

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
        "quarantined": quarantine_summary(written_quarantine),
        "ledger": ledger,
        "class_coverage": coverage,
    }
    logger.info(
        "preprocessing done in %.1f s: %d shards (%d written now), %d samples",
        summary["elapsed_s"], len(names), len(run_records), summary["samples"],
    )
    return summary
