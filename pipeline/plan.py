"""The seeded shard plan: which clips form which groups, their no-mix windows, and which shard holds them.

Made on the driver before any decoding, from the manifest, the config and a seed only (never from the
cluster's size or block layout), so the plan alone decides what every shard contains.

Per split (sorted by name), keys are sorted. A mix split gets `mixture_epochs` independent plans: the keys
are permuted with a generator seeded by (seed, split, epoch), cut into groups of G, and the last incomplete
group is completed with filler clips drawn from the split's other clips (rows with filler=True; the ledger
counts them separately). Each slot's row carries the no-mix windows (i1, i2) of the mixture whose primary
it is; groups fill shards of `groups_per_shard`. An evaluation split (mix=False) has one clip per sample,
in key order, `clips_per_eval_shard` samples per shard, epoch 0, and i1 = i2 = -1.

Plan rows are ordered by (split, epoch, shard, sample, slot).
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import MixingConfig, ShardConfig
from pipeline.mixing import draw_windows_batch, nomix_rows

PLAN_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("sample", pa.int32(), nullable=False),
        pa.field("slot", pa.int32(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("filler", pa.bool_(), nullable=False),
        pa.field("i1", pa.int32(), nullable=False),
        pa.field("i2", pa.int32(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("label_indices", pa.list_(pa.int32()), nullable=False),
    ]
)
PLAN_METADATA_KEY = b"sslam.plan"
# Where a clip's audio lives does not change what a shard holds, so the fingerprint leaves it out.
FINGERPRINT_EXCLUDED_COLUMNS = ("path",)
REQUIRED_MANIFEST_COLUMNS = ("key", "split", "mix", "path", "label_indices")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
SHARD_NAME = re.compile(r"(?P<split>[A-Za-z0-9_-]+)-e(?P<epoch>\d{2,})-(?P<shard>\d{6,})\.tar")


def shard_name(split: str, epoch: int, shard: int) -> str:
    """`{split}-e{epoch:02d}-{shard:06d}.tar`; split names are letters, digits, '_' and '-' (no dots)."""
    if not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split name {split!r} may only hold letters, digits, '_' and '-'")
    if epoch < 0 or shard < 0:
        raise ValueError(f"epoch and shard must be >= 0, got {epoch}, {shard}")
    return f"{split}-e{epoch:02d}-{shard:06d}.tar"


def parse_shard_name(name: str) -> tuple[str, int, int]:
    """Inverse of `shard_name`: (split, epoch, shard)."""
    match = SHARD_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a shard name of the form split-eEE-SSSSSS.tar")
    return match["split"], int(match["epoch"]), int(match["shard"])


def sample_key(split: str, epoch: int, shard: int, sample: int) -> str:
    """The WebDataset key of a sample: `{split}-e{epoch:02d}-{shard:06d}-{sample:06d}`."""
    return f"{shard_name(split, epoch, shard)[: -len('.tar')]}-{sample:06d}"


def _split_epoch_rng(seed: int, split: str, epoch: int) -> np.random.Generator:
    split_id = int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(split_id, epoch)))


def _check_manifest(manifest: pa.Table) -> None:
    missing = [name for name in REQUIRED_MANIFEST_COLUMNS if name not in manifest.column_names]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}")


def _mix_split_rows(
    count: int,
    split: str,
    mixing: MixingConfig,
    shards: ShardConfig,
    time_patches: int,
    window_rows: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Plan columns of one mix split of `count` clips over all mixture epochs ("index": clip positions)."""
    group_size = mixing.group_size
    if count < group_size:
        raise ValueError(
            f"mix split {split!r} has {count} clips, fewer than the group size {group_size}: "
            "a group cannot be completed with distinct clips"
        )
    names = ("epoch", "shard", "sample", "slot", "index", "filler", "i1", "i2")
    columns: dict[str, list] = {name: [] for name in names}
    for epoch in range(mixing.mixture_epochs):
        rng = _split_epoch_rng(seed, split, epoch)
        order = rng.permutation(count)
        filler = np.zeros(len(order), dtype=bool)
        short = len(order) % group_size
        if short:
            last_group = order[len(order) - short :]
            candidates = np.setdiff1d(np.arange(count), last_group)
            fillers = rng.choice(candidates, size=group_size - short, replace=False)
            order = np.concatenate([order, np.sort(fillers)])
            filler = np.concatenate([filler, np.ones(group_size - short, dtype=bool)])
        i1, i2 = draw_windows_batch(time_patches, window_rows, rng, len(order))
        group = np.arange(len(order)) // group_size
        columns["epoch"].append(np.full(len(order), epoch))
        columns["shard"].append(group // shards.groups_per_shard)
        columns["sample"].append(group % shards.groups_per_shard)
        columns["slot"].append(np.arange(len(order)) % group_size)
        columns["index"].append(order)
        columns["filler"].append(filler)
        columns["i1"].append(i1)
        columns["i2"].append(i2)
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def _eval_split_rows(count: int, shards: ShardConfig) -> dict[str, np.ndarray]:
    """Plan columns of an evaluation split of `count` clips: one clip per sample, in key order."""
    position = np.arange(count)
    return {
        "epoch": np.zeros(count, dtype=np.int64),
        "shard": position // shards.clips_per_eval_shard,
        "sample": position % shards.clips_per_eval_shard,
        "slot": np.zeros(count, dtype=np.int64),
        "index": position,
        "filler": np.zeros(count, dtype=bool),
        "i1": np.full(count, -1),
        "i2": np.full(count, -1),
    }


def make_plan(
    manifest: pa.Table, mixing: MixingConfig, shards: ShardConfig, time_patches: int, seed: int
) -> pa.Table:
    """The plan table (PLAN_SCHEMA, one row per clip slot); see the module docstring.

    Schema metadata `sslam.plan` (JSON) records seed, time_patches, r, group_size, mixture_epochs,
    groups_per_shard and clips_per_eval_shard.
    """
    _check_manifest(manifest)
    if mixing.group_size < 2:
        raise ValueError(f"mixing.group_size must be >= 2, got {mixing.group_size}")
    if mixing.mixture_epochs < 1:
        raise ValueError(f"mixing.mixture_epochs must be >= 1, got {mixing.mixture_epochs}")
    if shards.groups_per_shard < 1 or shards.clips_per_eval_shard < 1:
        raise ValueError("shards.groups_per_shard and shards.clips_per_eval_shard must be >= 1")
    window_rows = nomix_rows(time_patches, mixing.nomix_rows)
    split_column = manifest.column("split").combine_chunks()
    carried = manifest.select(["key", "path", "label_indices"])

    pieces = []
    for split in sorted(pc.unique(split_column).to_pylist()):
        shard_name(split, 0, 0)  # validates the split name
        positions = np.flatnonzero(pc.equal(split_column, split).to_numpy(zero_copy_only=False))
        keys = manifest.column("key").take(positions)
        positions = positions[pc.sort_indices(keys).to_numpy()]
        keys = manifest.column("key").take(positions).combine_chunks()
        repeated = pc.equal(keys[1:], keys[:-1]) if len(keys) > 1 else pa.array([], pa.bool_())
        if pc.any(repeated).as_py():
            first = int(np.flatnonzero(repeated.to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"split {split!r} repeats keys, e.g. {keys[first].as_py()!r}")
        mix_flags = pc.unique(manifest.column("mix").take(positions)).to_pylist()
        if len(mix_flags) != 1:
            raise ValueError(f"split {split!r} mixes rows with mix=True and mix=False")
        if mix_flags[0]:
            columns = _mix_split_rows(len(positions), split, mixing, shards, time_patches, window_rows, seed)
        else:
            columns = _eval_split_rows(len(positions), shards)
        chosen = carried.take(positions[columns.pop("index")])
        columns["split"] = pa.array([split] * chosen.num_rows, pa.string())
        for name in chosen.column_names:
            columns[name] = chosen.column(name).cast(PLAN_SCHEMA.field(name).type)
        pieces.append(pa.table({name: columns[name] for name in PLAN_SCHEMA.names}, schema=PLAN_SCHEMA))

    metadata = {
        "seed": seed,
        "time_patches": time_patches,
        "r": window_rows,
        "group_size": mixing.group_size,
        "mixture_epochs": mixing.mixture_epochs,
        "groups_per_shard": shards.groups_per_shard,
        "clips_per_eval_shard": shards.clips_per_eval_shard,
    }
    schema = PLAN_SCHEMA.with_metadata({PLAN_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    if not pieces:
        return schema.empty_table()
    return pa.concat_tables(pieces).replace_schema_metadata(schema.metadata)


def plan_metadata(plan: pa.Table) -> dict:
    """The `sslam.plan` schema metadata of a plan (seed, time_patches, r, group_size, ...)."""
    raw = (plan.schema.metadata or {}).get(PLAN_METADATA_KEY)
    if raw is None:
        raise ValueError("table has no sslam.plan metadata: not made by make_plan")
    return json.loads(raw)


def plan_fingerprint(plan: pa.Table) -> str:
    """sha256 (hex) over the plan's metadata and every column but `path`, independent of chunking."""
    digest = hashlib.sha256()
    digest.update(json.dumps(plan_metadata(plan), sort_keys=True).encode("utf-8"))
    for name in PLAN_SCHEMA.names:
        if name in FINGERPRINT_EXCLUDED_COLUMNS:
            continue
        column = plan.column(name).combine_chunks()
        digest.update(name.encode("utf-8") + b"\x00")
        if pa.types.is_string(column.type):
            for value in column.to_pylist():
                digest.update(value.encode("utf-8") + b"\x00")
        elif pa.types.is_list(column.type):
            flat = column.flatten().to_numpy(zero_copy_only=False).astype("<i8")
            lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype("<i8")
            digest.update(lengths.tobytes() + flat.tobytes())
        else:
            digest.update(column.to_numpy(zero_copy_only=False).astype("<i8").tobytes())
    return digest.hexdigest()


def manifest_digest(manifest: pa.Table) -> str:
    """sha256 (hex) of what of a manifest enters the plan: (split, key, mix, label_indices) rows in sorted order.

    Paths are left out, as in `plan_fingerprint`; so are the probed durations and sample rates.
    """
    _check_manifest(manifest)
    rows = sorted(
        zip(*(manifest.column(name).to_pylist() for name in ("split", "key", "mix", "label_indices")))
    )
    digest = hashlib.sha256()
    for split, key, mix, labels in rows:
        digest.update(json.dumps([split, key, bool(mix), [int(v) for v in labels]]).encode("utf-8") + b"\n")
    return digest.hexdigest()


def shard_tasks(plan: pa.Table) -> list[tuple[str, pa.Table]]:
    """One (shard name, plan rows of that shard) per output shard, in plan order (zero-copy slices)."""
    if plan.num_rows == 0:
        return []
    split = plan.column("split").combine_chunks()
    split_codes = split.dictionary_encode().indices.to_numpy()
    epoch = plan.column("epoch").to_numpy()
    shard = plan.column("shard").to_numpy()
    changed = (np.diff(split_codes) != 0) | (np.diff(epoch) != 0) | (np.diff(shard) != 0)
    starts = [0] + (np.flatnonzero(changed) + 1).tolist()
    ends = starts[1:] + [plan.num_rows]
    tasks = []
    seen = set()
    for start, end in zip(starts, ends):
        name = shard_name(split[start].as_py(), int(epoch[start]), int(shard[start]))
        if name in seen:
            raise ValueError(f"plan rows of shard {name} are not contiguous: is the plan sorted?")
        seen.add(name)
        tasks.append((name, plan.slice(start, end - start)))
    return tasks
