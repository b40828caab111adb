"""WebDataset input for training and evaluation: the shard set, the (rank, worker) split, the batches.

`TrainLoader` reads mixture epoch `epoch mod K` of a split and yields the batch contract of DESIGN.md
("Training batch"): {clean, mixed, partner, nomix, valid_frames}, tensors only; `loader.last_keys` holds the
sample keys of the last batch. `EvalLoader` yields {clean, labels, index, valid_frames} in shard order.
`valid_frames` (N,) long is each clip's frame count before its zero padding (the samples' json "frames"); a
shard written without it counts its clips as full length (T), and the loader logs that once per process.
`ShardSource` resolves where the shards and `dataset.json` are.

How a training epoch is split. Every rank computes the same plan up front from `dataset.json` and the
per-shard sample counts (`index.parquet`, or a scan of the tar headers when there is no index):

* The epoch's shards are permuted with (seed, epoch) and dealt to S = world_size x W slots, slot =
  rank * W + worker, W = max(1, num_workers). The first S * floor(n / S) shards go whole, round-robin.
  Each of the m = n mod S remaining shards (all of them when n < S) is shared by the slots j with
  j mod m equal to its position, and such a slot takes the samples whose ordinal in the shard is
  congruent to its share index modulo the number of sharers (`assign_shares`). Every sample belongs to
  exactly one slot, and a shard is read by at most ceil(S / m) slots.
* A slot shuffles its samples with a buffer seeded by (seed, epoch, rank, worker), before decoding,
  then decodes them (`pipeline.shards.decode_sample`, after checking the key against `SAMPLE_KEY`, so a
  member named with '..' or an absolute path is refused; a bad sample or shard is logged, counted in
  `skipped_samples` / `skipped_shards` and skipped) and forms batches of micro_batch_clips / G groups
  inside its worker; a worker's partial last batch is not served.
* A rank takes its workers' batches round-robin (the torch DataLoader order). Every rank stops after the
  same number of batches, the minimum over ranks of the planned counts, so no rank is left waiting in a
  collective; the samples left unserved are `dropped_samples` (logged). A rank that runs short anyway
  (corrupt data) ends its iterator early: `all_ranks_exhausted` lets every rank stop at the same step.

Position: `state_dict()` records, per worker, how many raw samples it has passed (bad ones included) and
which worker is next. A loader built with `start_position` makes each worker read and shuffle that many
samples again without decoding them, then continues: the rest of the epoch is exactly that of an
uninterrupted run. A position belongs to one rank of one layout (world size x workers).

Another layout mid-epoch (elastic resume): `resume_positions` turns the positions of every rank of the
saved layout into start positions for the new one, carrying the saved ones in `history`. The rests of
the saved slots, laid end to end, are cut into one contiguous range per new slot (`deal_rests`); a new
slot replays the streams its range touches (at most a few), passes over what they had consumed and takes
its range, so every sample of the epoch is still served once (or dropped and counted where the ranks'
batch counts must be equalised). Layouts can change again inside the same epoch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob as globbing
import itertools
import io
import json
import logging
import random
import signal
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import braceexpand
import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle
from webdataset.gopen import gopen, gopen_schemes

from pipeline.config import DataConfig, LoaderConfig
from pipeline.mixing import MIX_PADDINGS, logmel_max_batch
from pipeline.plan import parse_shard_name
from pipeline.shards import SAMPLE_KEY, ShardFormatError, decode_sample, iter_shard_samples
from pipeline.storage import locate

logger = logging.getLogger(__name__)

DATASET_INFO = "dataset.json"
INDEX_TABLE = "index.parquet"
PATTERN_CHARACTERS = set("*?[{")
POSITION_VERSION = 2  # 2: per-worker counts are raw samples passed (1 counted decoded ones)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
WORKER_JOIN_S = 10.0


# ---------------------------------------------------------------------------------------------------------
# Where the shards are


def _is_url(text: str) -> bool:
    return "://" in text or text.startswith("pipe:")


def _split_location(location: str) -> tuple[str, str | None]:
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
    """The parsed `dataset.json` of a shard location (folder, URL, glob/brace pattern or the json itself)."""
    root, _ = _split_location(location)
    resolved = locate(root)
    try:
        data = resolved.read(DATASET_INFO)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no {DATASET_INFO} in {root} (shard location {location!r})") from error
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{root}/{DATASET_INFO} is not UTF-8 JSON: {error}") from error
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise ValueError(f"{root}/{DATASET_INFO} has no 'splits' mapping")
    return info


def open_shard(url: str) -> io.IOBase:
    """A readable byte stream of a shard: local paths and WebDataset's URL schemes via its `gopen`,
    any other URL (s3://, memory://, ...) via fsspec."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url, "rb")
    return fsspec.open(url, "rb").open()


def count_shard_samples(url: str) -> int:
    """Samples (distinct consecutive keys) in a shard, read from its tar headers; a broken tail ends the count."""
    count = 0

    def tally(key: str) -> bool:
        nonlocal count
        count += 1
        return False  # counted, not read

    stream = open_shard(url)
    try:
        for _ in iter_shard_samples(stream, select=tally, keep_bad=True):
            pass
    except (ShardFormatError, OSError) as error:
        logger.warning("shard %s is unreadable after %d samples while counting: %s", url, count, error)
    finally:
        stream.close()
    return count


class MixedShardSetError(ValueError):
    """Shards of a set were written by another plan than the one its dataset.json describes."""


class ShardSource:
    """A shard set: its `dataset.json`, the shard URLs of a split and epoch, and their sample counts.

    `location` is a local folder or URL prefix holding `dataset.json`, `index.parquet` and the shards, or a
    glob / brace pattern of shard names in such a folder (it restricts which shards are used), or the path
    of `dataset.json` itself.

    `sample_counts` refuses (MixedShardSetError) a shard whose index rows carry another fingerprint than
    dataset.json, and, in an index that carries fingerprints, a shard it does not list that holds samples.
    An index without fingerprints (sets written before they existed, hand-made sets) is not checked.
    """

    def __init__(self, location: str):
        self.location = str(location)
        self.root, self.pattern = _split_location(self.location)
        self._resolved = locate(self.root)
        self.info = read_dataset_info(self.location)
        self._counts: dict[str, int] | None = None
        self._fingerprints: dict[str, set] = {}
        for key in ("target_length", "mel_bins", "patch_size"):
            if not isinstance(self.info.get(key), int) or self.info[key] < 1:
                raise ValueError(f"{self.root}/{DATASET_INFO}: {key!r} must be a positive integer")
        if self.info["target_length"] % self.info["patch_size"]:
            raise ValueError(f"{self.root}/{DATASET_INFO}: target_length is not a multiple of patch_size")
        self._allowed = self._pattern_names() if self.pattern is not None else None

    @property
    def classes(self) -> list[dict]:
        return list(self.info.get("classes", []))

    def split(self, name: str) -> dict:
        splits = self.info["splits"]
        if name not in splits:
            raise ValueError(f"split {name!r} is not in {self.root}/{DATASET_INFO} (splits: {sorted(splits)})")
        return splits[name]

    def mixture_epoch(self, split: str, epoch: int) -> int:
        """Training epoch e reads mixture epoch e mod K of a mix split; other splits have epoch 0 only."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        entry = self.split(split)
        if not entry.get("mix", False):
            return 0
        epochs = int(self.info.get("mixture_epochs") or len(entry["shards_per_epoch"]))
        return epoch % epochs

    def shard_names(self, split: str, epoch: int) -> list[str]:
        """Names of the split's shards read in training epoch `epoch`, in dataset.json order."""
        mixture_epoch = self.mixture_epoch(split, epoch)
        per_epoch = self.split(split).get("shards_per_epoch", {})
        names = per_epoch.get(str(mixture_epoch))
        if names is None:
            raise ValueError(
                f"{self.root}/{DATASET_INFO}: split {split!r} lists no shards for mixture epoch {mixture_epoch} "
                f"(has {sorted(per_epoch)})"
            )
        for name in names:
            parse_shard_name(name)
        if self._allowed is not None:
            names = [name for name in names if name in self._allowed]
        if not names:
            raise ValueError(f"no shards of split {split!r}, mixture epoch {mixture_epoch} in {self.location!r}")
        return list(names)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def sample_counts(self, names: Sequence[str]) -> list[int]:
        """Samples per shard, from `index.parquet` when present, else by reading the shards' tar headers."""
        if self._counts is None:
            self._counts = self._index_counts()
        missing = [name for name in names if name not in self._counts]
        if missing:
            logger.warning(
                "%d shards are not in %s/%s: counting their samples by reading them",
                len(missing), self.root, INDEX_TABLE,
            )
            self._counts.update({name: count_shard_samples(self.url(name)) for name in missing})
        self._check_fingerprints(names, missing)
        return [self._counts[name] for name in names]

    def _index_counts(self) -> dict[str, int]:
        if not self._resolved.exists(INDEX_TABLE):
            return {}
        fingerprinted = "fingerprint" in self._resolved.read_schema(INDEX_TABLE).names
        columns = ["shard", "fingerprint"] if fingerprinted else ["shard"]
        table = self._resolved.read_table(INDEX_TABLE, columns=columns)
        shard_column = table.column("shard").to_pylist()
        if fingerprinted:
            for name, fingerprint in zip(shard_column, table.column("fingerprint").to_pylist()):
                self._fingerprints.setdefault(name, set()).add(fingerprint)
            if all(found == {None} for found in self._fingerprints.values()):
                self._fingerprints = {}
        return dict(Counter(shard_column))

    def _check_fingerprints(self, names: Sequence[str], unindexed: Sequence[str]) -> None:
        if not self._fingerprints:
            return
        expected = self.info.get("fingerprint")
        foreign = {
            name: "index rows of fingerprint " + ", ".join(sorted(str(f)[:12] for f in self._fingerprints[name]))
            for name in names
            if self._fingerprints.get(name, {expected}) != {expected}
        }
        foreign.update({name: "not in the index but holds samples" for name in unindexed if self._counts.get(name)})
        if foreign:
            shown = "; ".join(f"{name}: {why}" for name, why in sorted(foreign.items())[:5])
            raise MixedShardSetError(
                f"{self.root}: {len(foreign)} shards were not written by the plan of {DATASET_INFO} (fingerprint "
                f"{str(expected)[:12]}): {shown}{'; ...' if len(foreign) > 5 else ''}. The set mixes runs: rebuild "
                "it (sslam preprocess --overwrite)"
            )

    def _pattern_names(self) -> set[str]:
        assert self.pattern is not None
        names: set[str] = set()
        for expanded in braceexpand.braceexpand(self.pattern):
            if set("*?[") & set(expanded):
                if _is_url(self.root):
                    filesystem, path = fsspec.core.url_to_fs(f"{self.root}/{expanded}")
                    names.update(p.rsplit("/", 1)[-1] for p in filesystem.glob(path))
                else:
                    names.update(p.rsplit("/", 1)[-1] for p in globbing.glob(f"{self.root}/{expanded}"))
            else:
                names.add(expanded)
        return names


# ---------------------------------------------------------------------------------------------------------
# Which slot reads which samples


@dataclasses.dataclass(frozen=True)
class Share:
    """A slot's part of one shard: the samples whose ordinal i in the shard has i mod parts == part."""

    shard: int  # position in the epoch's shard list
    parts: int
    part: int

    def count(self, samples: int) -> int:
        return len(range(self.part, samples, self.parts))


def assign_shares(num_shards: int, slots: int) -> list[list[Share]]:
    """The shares of each of `slots` slots (see the module docstring): whole shards round-robin, then the
    remaining n mod S shards each split by sample ordinal among the slots with j mod (n mod S) = its position."""
    if num_shards < 1 or slots < 1:
        raise ValueError(f"need at least one shard and one slot, got {num_shards} shards, {slots} slots")
    whole = num_shards - num_shards % slots
    shares: list[list[Share]] = [[] for _ in range(slots)]
    for shard in range(whole):
        shares[shard % slots].append(Share(shard, 1, 0))
    remaining = num_shards - whole
    if remaining:
        for slot in range(slots):
            position = slot % remaining
            sharers = len(range(position, slots, remaining))
            shares[slot].append(Share(whole + position, sharers, slot // remaining))
    return shares


def deal_rests(rests: Sequence[int], slots: int) -> list[list[tuple[int, int, int]]]:
    """Lay `rests` (samples left per earlier slot) end to end and cut them into `slots` contiguous ranges of
    equal size (within one); per new slot, its (earlier slot, offset in that slot's rest, count) pieces."""
    total = sum(rests)
    bounds = [total * k // slots for k in range(slots + 1)]
    starts = np.concatenate([[0], np.cumsum(rests)]).astype(int).tolist()
    dealt: list[list[tuple[int, int, int]]] = []
    for low, high in zip(bounds, bounds[1:]):
        pieces = []
        for unit, rest in enumerate(rests):
            begin, end = max(low, starts[unit]), min(high, starts[unit] + rest)
            if end > begin:
                pieces.append((unit, begin - starts[unit], end - begin))
        dealt.append(pieces)
    return dealt


def _init_worker(worker_id: int) -> None:
    """Preemption sends SIGTERM to every process; workers leave it to the rank, which checkpoints first. A
    worker dies with its rank (Linux parent-death signal), so a SIGKILLed rank leaves no worker behind."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _stop_workers(iterator: Any) -> None:
    """End a DataLoader iterator's workers now. They ignore SIGTERM, so the interpreter's exit-time
    terminate() and join() of daemonic children would wait forever on one that is still busy: the
    DataLoader's own shutdown first (it joins each for a few seconds), then SIGKILL for what is left."""
    workers = list(getattr(iterator, "_workers", []))
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=WORKER_JOIN_S)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------------------
# Reading one slot's samples (runs inside a DataLoader worker)


class _Skips:
    """Bad shards and samples one worker met: logged once each, counted, reported as deltas."""

    def __init__(self) -> None:
        self.samples = 0
        self.broken_shards: set[str] = set()
        self._reported = (0, 0)

    def shard_handler(self, url: str):
        def handle(error: Exception) -> bool:
            if url not in self.broken_shards:
                self.broken_shards.add(url)
                logger.warning("shard %s is broken, the rest of it is skipped: %r", url, error)
            return True

        return handle

    def bad_sample(self, key: str, url: str, error: Exception) -> None:
        self.samples += 1
        logger.warning("sample %s of %s skipped: %s", key, url, error)

    def missing_samples(self, url: str, count: int) -> None:
        self.samples += count
        if url not in self.broken_shards:
            self.broken_shards.add(url)
        logger.warning("shard %s ended %d samples early (of this reader's share); they are skipped", url, count)

    def take(self) -> tuple[int, int]:
        """(samples, shards) skipped since the last call."""
        now = (self.samples, len(self.broken_shards))
        delta = (now[0] - self._reported[0], now[1] - self._reported[1])
        self._reported = now
        return delta


class _ShareSelector:
    """`select` of the shard reader: takes only this share's samples, and notes their ordinals in the shard."""

    def __init__(self, share: Share) -> None:
        self.share = share
        self.ordinals: dict[str, int] = {}
        self._seen = 0

    def __call__(self, key: str) -> bool:
        take = self._seen % self.share.parts == self.share.part
        if take:
            self.ordinals[key] = self._seen
        self._seen += 1
        return take


def _read_share(url: str, share: Share, expected: int, skips: _Skips) -> Iterator[dict]:
    """Raw samples (member bytes) of one share, in tar order, with "__shard__" and "__ordinal__" (in the shard);
    a sample the reader refused holds only its "__error__"."""
    handler = skips.shard_handler(url)
    selector = _ShareSelector(share)
    yielded = 0
    try:
        stream = open_shard(url)
    except (OSError, ValueError) as error:  # a missing object or unreachable URL: the shard is skipped
        handler(error)
        stream = None
    if stream is not None:
        try:
            for key, members in iter_shard_samples(stream, select=selector, keep_bad=True):
                sample = {"__error__": members} if isinstance(members, ShardFormatError) else dict(members)
                sample.update(__key__=key, __url__=url, __shard__=share.shard)
                sample["__ordinal__"] = selector.ordinals.pop(key, -1)
                yielded += 1
                yield sample
        except ShardFormatError as error:
            handler(error)
        finally:
            stream.close()
    missing = share.count(expected) - yielded
    if missing > 0:
        skips.missing_samples(url, missing)


def _read_shares(urls: Sequence[str], shares: Sequence[Share], counts: Sequence[int], skips: _Skips) -> Iterator[dict]:
    for share in shares:
        yield from _read_share(urls[share.shard], share, counts[share.shard], skips)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """What a decoded sample must look like, from dataset.json."""

    target_length: int
    mel_bins: int
    patch_size: int
    group_size: int
    rows: int
    num_classes: int
    materialized: bool
    mix_padding: str

    @property
    def time_patches(self) -> int:
        return self.target_length // self.patch_size


def _check_raw_sample(sample: dict) -> None:
    """Raise what the shard reader found wrong with the sample's members, or a key our writer does not write
    (`{key}.{member}` with a plain key)."""
    if "__error__" in sample:
        raise sample["__error__"]
    key = sample["__key__"]
    if not SAMPLE_KEY.fullmatch(key):
        raise ShardFormatError(f"sample key {key!r} is not a plain name (letters, digits, '_' and '-' only)")


def _decode_group(sample: dict, geometry: _Geometry) -> dict:
    decoded = decode_sample(
        sample,
        expected_shape=(geometry.target_length, geometry.mel_bins),
        group_size=geometry.group_size,
        time_patches=geometry.time_patches,
    )
    meta = decoded["meta"]
    if "mixtures" not in meta:
        raise ShardFormatError("a training split sample must be a mixture group")
    if meta["r"] != geometry.rows:
        raise ShardFormatError(f"json: r={meta['r']}, dataset.json says r={geometry.rows}")
    if geometry.materialized and not decoded["mixtures"]:
        raise ShardFormatError("dataset.json says mixtures are materialised but m*.npy members are missing")
    return decoded


@functools.lru_cache(maxsize=1)
def _log_full_length_once() -> None:
    logger.warning(
        "samples without a 'frames' field (shards written before valid lengths were recorded): their clips count "
        "as full length in valid_frames, so model.padding=aware treats their padding as content"
    )


def valid_frame_counts(meta: dict, count: int, frames: int) -> list[int]:
    """The json's "frames" (valid frame count per clip), or `frames` for every clip of an older sample."""
    if "frames" in meta:
        return [int(value) for value in meta["frames"]]
    _log_full_length_once()
    return [frames] * count


def _collate_groups(groups: Sequence[dict], geometry: _Geometry) -> dict[str, torch.Tensor]:
    """The training batch contract of a list of decoded groups (partner indices offset by group position).

    Arrays are converted to float32 once, straight into the batch tensors; inside a DataLoader worker those
    live in shared memory already, so handing the batch to the main process copies nothing more."""
    size = geometry.group_size
    count = len(groups) * size
    shape = (count, 1, geometry.target_length, geometry.mel_bins)
    clean, mixed = torch.empty(shape), torch.empty(shape)
    if get_worker_info() is not None:
        clean.share_memory_()
        mixed.share_memory_()
    nomix = torch.zeros(count, geometry.time_patches, dtype=torch.bool)
    partner = torch.empty(count, dtype=torch.long)
    valid_frames = torch.empty(count, dtype=torch.long)
    for g, group in enumerate(groups):
        rows = slice(g * size, (g + 1) * size)
        meta = group["meta"]
        valid_frames[rows] = torch.tensor(valid_frame_counts(meta, size, geometry.target_length))
        for i, mixture in enumerate(meta["mixtures"]):
            partner[g * size + i] = g * size + mixture["partner"]
            for start, end in mixture["nomix"]:
                nomix[g * size + i, start:end] = True
            clean[g * size + i, 0].copy_(torch.from_numpy(group["clips"][i]))
            if group["mixtures"]:
                mixed[g * size + i, 0].copy_(torch.from_numpy(group["mixtures"][i]))
        if not group["mixtures"]:
            local_partner = partner[rows] - g * size
            frames = valid_frames[rows] if "frames" in meta else None
            mixed[rows, 0] = logmel_max_batch(
                clean[rows, 0], local_partner, nomix[rows], geometry.patch_size, geometry.mix_padding, frames
            )
    return {"clean": clean, "mixed": mixed, "partner": partner, "nomix": nomix, "valid_frames": valid_frames}


@dataclasses.dataclass
class _Slot:
    """The raw samples one (rank, worker) slot reads in an epoch: its shares, shuffled with `shuffle_seed`,
    or (after a resume on another layout) its `replays` of the slots of the layout before."""

    shares: list[Share]
    shuffle_seed: int
    replays: list[_Replay] | None = None


@dataclasses.dataclass
class _Replay:
    """A contiguous part of the rest of an earlier layout's slot: its stream is replayed, `skip` samples
    (the ones it had consumed, then the parts of its rest dealt to other slots) passed over, `take` taken."""

    source: _Slot
    skip: int
    take: int


@dataclasses.dataclass
class _WorkerPlan:
    slot: _Slot
    skip: int  # raw samples already consumed (a restart passes over them without decoding)
    finished: bool  # the worker had ended before the saved position: read nothing


class _TrainStream(IterableDataset):
    """One rank's workers. Each yields (batch, meta) per batch and a final (None, meta) with trailing counts;
    meta = {"worker", "consumed", "keys", "skipped_samples", "skipped_shards"}; `consumed` counts the raw
    samples the worker has passed, the ones that failed to decode included."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        plans: list[_WorkerPlan],
        geometry: _Geometry,
        groups_per_batch: int,
        shuffle_buffer: int,
        worker_offset: int,
    ) -> None:
        self.urls, self.counts, self.plans = urls, counts, plans
        self.geometry, self.groups_per_batch = geometry, groups_per_batch
        self.shuffle_buffer, self.worker_offset = shuffle_buffer, worker_offset

    def _raw(self, slot: _Slot, skips: _Skips) -> Iterator[dict]:
        if slot.replays is None:
            buffer = max(1, self.shuffle_buffer)
            raw = _read_shares(self.urls, slot.shares, self.counts, skips)
            yield from shuffle(buffer, buffer, rng=random.Random(slot.shuffle_seed))(raw)
            return
        for replay in slot.replays:
            # What an earlier slot read is not this worker's to count (its part of it is counted on decode).
            samples = self._raw(replay.source, _Skips())
            collections.deque(itertools.islice(samples, replay.skip), maxlen=0)
            yield from itertools.islice(samples, replay.take)

    def __iter__(self) -> Iterator[tuple[dict | None, dict]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.worker_offset) % len(self.plans)
        plan = self.plans[worker]
        if plan.finished:
            return
        skips = _Skips()
        raw = self._raw(plan.slot, skips)
        collections.deque(itertools.islice(raw, plan.skip), maxlen=0)
        consumed = plan.skip
        groups: list[dict] = []
        keys: list[str] = []
        for sample in raw:
            consumed += 1
            try:
                _check_raw_sample(sample)
                groups.append(_decode_group(sample, self.geometry))
            except ShardFormatError as error:
                skips.bad_sample(sample["__key__"], sample["__url__"], error)
                continue
            keys.append(sample["__key__"])
            if len(groups) == self.groups_per_batch:
                batch = _collate_groups(groups, self.geometry)
                yield batch, self._meta(worker, consumed, keys, skips)
                groups, keys = [], []
        yield None, self._meta(worker, consumed, [], skips)

    @staticmethod
    def _meta(worker: int, consumed: int, keys: list[str], skips: _Skips) -> dict:
        samples, shards = skips.take()
        return {"worker": worker, "consumed": consumed, "keys": list(keys), "skipped_samples": samples,
                "skipped_shards": shards}


def _unchanged(item: Any) -> Any:
    return item


def _data_config(cfg: LoaderConfig | DataConfig) -> tuple[LoaderConfig, str | None]:
    if isinstance(cfg, DataConfig):
        return cfg.loader, cfg.mixing.mix_padding
    if isinstance(cfg, LoaderConfig):
        return cfg, None
    raise TypeError(f"cfg must be a LoaderConfig or DataConfig, got {type(cfg).__name__}")


def _geometry(source: ShardSource, mix_padding: str | None) -> _Geometry:
    info = source.info
    padding = mix_padding or info.get("mix_padding", "zero")
    if padding not in MIX_PADDINGS:
        raise ValueError(f"mix_padding must be one of {MIX_PADDINGS}, got {padding!r}")
    return _Geometry(
        target_length=info["target_length"],
        mel_bins=info["mel_bins"],
        patch_size=info["patch_size"],
        group_size=int(info.get("group_size", 1)),
        rows=int(info.get("r", 0)),
        num_classes=len(info.get("classes", [])),
        materialized=bool(info.get("materialize_mixtures", False)),
        mix_padding=padding,
    )


# ---------------------------------------------------------------------------------------------------------
# Training


class TrainLoader:
    """One epoch of training batches for one rank (see the module docstring for the split and restarts).

    cfg: LoaderConfig (or DataConfig, whose `mixing.mix_padding` then applies to mixtures formed here;
    otherwise dataset.json's "mix_padding", default "zero"). Iterate it for the batches; `last_keys`,
    `num_batches`, `dropped_samples`, `skipped_samples`, `skipped_shards`, `exhausted` describe the run.
    """

    def __init__(
        self,
        cfg: LoaderConfig | DataConfig,
        split: str,
        rank: int,
        world_size: int,
        epoch: int,
        seed: int | None = None,
        start_position: dict | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.cfg, mix_padding = _data_config(cfg)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.split, self.rank, self.world_size, self.epoch = split, rank, world_size, epoch
        self.seed = self.cfg.seed if seed is None else seed
        self.pin_memory = pin_memory
        self.source = ShardSource(self.cfg.shards)
        if not self.source.split(split).get("mix", False):
            raise ValueError(f"split {split!r} is not a mix split; training reads mixture groups")
        missing = [key for key in ("group_size", "r") if not isinstance(self.source.info.get(key), int)]
        if missing:
            raise ValueError(f"{self.source.root}/{DATASET_INFO} lacks {missing}, needed for mixture groups")
        self.geometry = _geometry(self.source, mix_padding)
        size = self.geometry.group_size
        if size < 2 or self.cfg.micro_batch_clips < size or self.cfg.micro_batch_clips % size:
            raise ValueError(
                f"micro_batch_clips ({self.cfg.micro_batch_clips}) must be a positive multiple of the dataset's "
                f"group size G = {size}"
            )
        self.groups_per_batch = self.cfg.micro_batch_clips // size
        self.workers = max(1, self.cfg.num_workers)
        self.mixture_epoch = self.source.mixture_epoch(split, epoch)

        names = self.source.shard_names(split, epoch)
        order = np.random.default_rng(_seed(self.seed, epoch)).permutation(len(names))
        names = [names[i] for i in order]
        self._urls = [self.source.url(name) for name in names]
        self._counts = self.source.sample_counts(names)
        self._history = start_position.get("history", []) if start_position is not None else []
        slots, slot_samples = self._slots(len(names), self._history)
        worker_batches = [n // self.groups_per_batch for n in slot_samples]
        rank_batches = [sum(worker_batches[r * self.workers : (r + 1) * self.workers]) for r in range(world_size)]
        self.num_batches = min(rank_batches)
        own = slice(rank * self.workers, (rank + 1) * self.workers)
        self._slots_of_rank, self._worker_batches = slots[own], worker_batches[own]
        self.rank_samples = sum(slot_samples[own])
        self.total_samples = sum(self._counts)
        if self.num_batches == 0 and not self._history:
            raise ValueError(
                f"split {split!r} epoch {epoch}: some rank gets no whole batch of {self.groups_per_batch} groups "
                f"per worker (samples per (rank, worker) slot: {slot_samples}); use fewer ranks or workers or a "
                f"smaller micro_batch_clips"
            )

        self.batches = 0
        self.skipped_samples = 0
        self.skipped_shards = 0
        self.exhausted = False
        self.last_keys: list[str] = []
        self._consumed = [0] * self.workers
        self._finished = [False] * self.workers
        self._next_worker = 0
        if start_position is not None:
            self._restore(start_position)
        self.dropped_samples = self.rank_samples - self.num_batches * self.groups_per_batch
        logger.info(
            "split %s epoch %d (mixture epoch %d) rank %d/%d: %d shards, %d samples on this rank, %d batches of "
            "%d groups per rank, %d samples dropped here to keep the ranks equal",
            split, epoch, self.mixture_epoch, rank, world_size, len(names), self.rank_samples, self.num_batches,
            self.groups_per_batch, self.dropped_samples,
        )

    def __len__(self) -> int:
        return self.num_batches - self.batches

    def state_dict(self) -> dict:
        """This rank's position in the epoch (plain Python values)."""
        return {
            "version": POSITION_VERSION,
            "split": self.split,
            "epoch": self.epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.workers,
            "batches": self.batches,
            "worker_samples": list(self._consumed),
            "worker_finished": list(self._finished),
            "next_worker": self._next_worker,
            "skipped_samples": self.skipped_samples,
            "skipped_shards": self.skipped_shards,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            **({"history": self._history} if self._history else {}),
        }

    def _slots(self, num_shards: int, history: list[list[dict]]) -> tuple[list[_Slot], list[int]]:
        """This layout's slots and their planned raw sample counts.

        `history` holds, for every earlier layout this epoch was served on, the positions of all its ranks
        when it stopped. The first layout's slots read shards; each later layout lays the rests of the
        slots before it (planned minus consumed) end to end and gives each of its slots an equal
        contiguous range (`deal_rests`), so every sample of the epoch still goes to exactly one slot and
        the slots' counts differ by at most one."""
        layouts = [(layer[0]["world_size"], layer[0]["num_workers"]) for layer in history]
        layouts.append((self.world_size, self.workers))
        ranks, workers = layouts[0]
        shares = assign_shares(num_shards, ranks * workers)
        slots = [_Slot(shares[j], _seed(self.seed, self.epoch, j // workers, j % workers)) for j in range(len(shares))]
        planned = [sum(s.count(self._counts[s.shard]) for s in slot.shares) for slot in slots]
        for layer, (ranks, workers) in zip(history, layouts[1:]):
            consumed, rest = self._rests(layer, planned)
            dealt = deal_rests(rest, ranks * workers)
            slots = [_Slot([], 0, [_Replay(slots[u], consumed[u] + offset, count) for u, offset, count in parts])
                     for parts in dealt]
            planned = [sum(count for _, _, count in parts) for parts in dealt]
        return slots, planned

    def _rests(self, layer: list[dict], planned: list[int]) -> tuple[list[int], list[int]]:
        """(consumed, left) raw samples per slot of an earlier layout, from the positions of its ranks."""
        ranks, workers = layer[0]["world_size"], layer[0]["num_workers"]
        if sorted(p["rank"] for p in layer) != list(range(ranks)) or len(planned) != ranks * workers:
            raise ValueError(f"the saved loader positions are not one per rank of {ranks} x {workers} workers")
        for position in layer:
            own = {"version": POSITION_VERSION, "split": self.split, "epoch": self.epoch, "seed": self.seed,
                   "shuffle_buffer": self.cfg.shuffle_buffer}
            wrong = {k: (position.get(k), v) for k, v in own.items() if position.get(k) != v}
            if wrong:
                details = ", ".join(f"{k}: saved {got!r}, now {want!r}" for k, (got, want) in wrong.items())
                raise ValueError(f"the saved loader positions do not belong to this epoch ({details})")
        consumed, left = [0] * len(planned), [0] * len(planned)
        for position in layer:
            for worker in range(workers):
                slot = position["rank"] * workers + worker
                consumed[slot] = int(position["worker_samples"][worker])
                left[slot] = 0 if position["worker_finished"][worker] else max(0, planned[slot] - consumed[slot])
        return consumed, left

    def _restore(self, position: dict) -> None:
        expected = {"version": POSITION_VERSION, "split": self.split, "epoch": self.epoch, "seed": self.seed,
                    "rank": self.rank, "world_size": self.world_size, "num_workers": self.workers}
        if "shuffle_buffer" in position:
            expected["shuffle_buffer"] = self.cfg.shuffle_buffer
        wrong = {k: (position.get(k), v) for k, v in expected.items() if position.get(k) != v}
        if wrong:
            details = ", ".join(f"{k}: saved {got!r}, now {want!r}" for k, (got, want) in wrong.items())
            raise ValueError(f"the loader position does not belong to this loader ({details})")
        self.batches = int(position["batches"])
        self._consumed = [int(n) for n in position["worker_samples"]]
        self._finished = [bool(f) for f in position["worker_finished"]]
        self._next_worker = int(position["next_worker"])
        self.skipped_samples = int(position["skipped_samples"])
        self.skipped_shards = int(position["skipped_shards"])
        if len(self._consumed) != self.workers or self.batches > self.num_batches:
            raise ValueError(f"the loader position {position} does not fit this epoch's plan")

    def _dataset(self) -> _TrainStream:
        plans = [
            _WorkerPlan(slot=self._slots_of_rank[w], skip=self._consumed[w], finished=self._finished[w])
            for w in range(self.workers)
        ]
        return _TrainStream(
            self._urls, self._counts, plans, self.geometry, self.groups_per_batch, self.cfg.shuffle_buffer,
            self._next_worker,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.batches >= self.num_batches:
            return
        loader = DataLoader(
            self._dataset(), batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_unchanged,
            pin_memory=self.pin_memory, worker_init_fn=_init_worker,
        )
        iterator = iter(loader)
        try:
            while self.batches < self.num_batches:
                item = next(iterator, None)
                if item is None:
                    break
                batch, meta = item
                self.skipped_samples += meta["skipped_samples"]
                self.skipped_shards += meta["skipped_shards"]
                worker = meta["worker"]
                self._consumed[worker] = meta["consumed"]
                if batch is None:
                    self._finished[worker] = True
                    continue
                self.batches += 1
                self.last_keys = meta["keys"]
                self._next_worker = (worker + 1) % self.workers
                yield batch
        finally:
            _stop_workers(iterator)
        self._finish()

    def _finish(self) -> None:
        if self.batches < self.num_batches:
            self.exhausted = True
            logger.warning(
                "split %s epoch %d rank %d ran out after %d of %d batches (%d samples skipped as broken)",
                self.split, self.epoch, self.rank, self.batches, self.num_batches, self.skipped_samples,
            )
        served = self.batches * self.groups_per_batch
        self.dropped_samples = max(0, self.rank_samples - served - self.skipped_samples)
        logger.info(
            "split %s epoch %d rank %d: served %d samples in %d batches, dropped %d, skipped %d samples and %d shards",
            self.split, self.epoch, self.rank, served, self.batches, self.dropped_samples, self.skipped_samples,
            self.skipped_shards,
        )


def resume_positions(positions: list, world_size: int, num_workers: int) -> list:
    """The start position of each of `world_size` ranks from the positions saved by every rank of a run:
    the saved ones when the layout (ranks x workers) is the same, else positions that carry the saved ones
    as a new layer of `history`, so the rest of the epoch of every saved slot is served exactly once
    across the new slots (`TrainLoader._slots`)."""
    workers = max(1, num_workers)
    if not positions or any(p is None for p in positions):
        return [None] * world_size
    first = positions[0]
    if (first["world_size"], first["num_workers"]) == (world_size, workers) and len(positions) == world_size:
        return list(positions)
    history = [*first.get("history", []), [{k: v for k, v in p.items() if k != "history"} for p in positions]]
    fields = ("version", "split", "epoch", "seed", "shuffle_buffer")
    return [
        {**{k: first[k] for k in fields if k in first}, "rank": rank, "world_size": world_size,
         "num_workers": workers, "batches": 0, "worker_samples": [0] * workers, "worker_finished": [False] * workers,
         "next_worker": 0, "skipped_samples": 0, "skipped_shards": 0, "history": history}
        for rank in range(world_size)
    ]


def all_ranks_exhausted(exhausted: bool, device: torch.device | str | None = None) -> bool:
    """True on every rank when any rank's loader is exhausted (a MAX all-reduce when torch.distributed is
    initialised; the flag itself otherwise). Call it once per step on every rank, before using the batch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(exhausted)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if exhausted else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# ---------------------------------------------------------------------------------------------------------
# Evaluation


class _EvalStream(IterableDataset):
    """Workers of one rank's evaluation pass; each yields (clip, meta) per clip and a final (None, meta)."""

    def __init__(
        self, urls: list[str], counts: list[int], offsets: list[int], shares: list[list[Share]], geometry: _Geometry
    ) -> None:
        self.urls, self.counts, self.offsets, self.shares, self.geometry = urls, counts, offsets, shares, geometry

    def __iter__(self) -> Iterator[tuple[dict | None, dict]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        skips = _Skips()
        geometry = self.geometry
        for sample in _read_shares(self.urls, self.shares[worker], self.counts, skips):
            key, url = sample["__key__"], sample["__url__"]
            try:
                _check_raw_sample(sample)
                decoded = decode_sample(sample, expected_shape=(geometry.target_length, geometry.mel_bins))
                labels = decoded["meta"]["labels"]
                if any(label >= geometry.num_classes for clip in labels for label in clip):
                    raise ShardFormatError(f"json: a label is outside the {geometry.num_classes} classes")
            except ShardFormatError as error:
                skips.bad_sample(key, url, error)
                continue
            index = self.offsets[sample["__shard__"]] + sample["__ordinal__"]
            meta = decoded["meta"]
            filler = meta.get("filler", [False] * len(decoded["clips"]))
            group = len(decoded["clips"])
            valid = valid_frame_counts(meta, group, geometry.target_length)
            for i, clip in enumerate(decoded["clips"]):
                if filler[i]:
                    continue
                samples, shards = skips.take()
                clip_index = index if group == 1 else index * group + i
                item = {"clean": torch.from_numpy(clip), "labels": labels[i], "index": clip_index, "key": key,
                        "valid_frames": valid[i]}
                yield item, {"skipped_samples": samples, "skipped_shards": shards}
        samples, shards = skips.take()
        yield None, {"skipped_samples": samples, "skipped_shards": shards}


class EvalLoader:
    """Evaluation batches {clean (N, 1, T, F) float32, labels (N, C) float32 multi-hot, index (N,) long,
    valid_frames (N,) long}.

    No shuffle and no drop: the last batch is smaller. `index` is the sample's running index in the split
    (shards in dataset.json order; in a mix split, clip i of sample s has index s * G + i and filler clips
    are left out). With world_size > 1 each rank gets a disjoint part (the training split scheme, unshuffled).
    """

    def __init__(
        self,
        cfg: LoaderConfig | DataConfig,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
    ) -> None:
        self.cfg, mix_padding = _data_config(cfg)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.split, self.rank, self.world_size = split, rank, world_size
        self.batch_size = batch_size or self.cfg.micro_batch_clips
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.source = ShardSource(self.cfg.shards)
        self.geometry = _geometry(self.source, mix_padding)
        if self.geometry.num_classes < 1:
            raise ValueError(f"{self.source.root}/{DATASET_INFO} has no class list")
        self.classes = self.source.classes
        names = self.source.shard_names(split, 0)
        self._urls = [self.source.url(name) for name in names]
        self._counts = self.source.sample_counts(names)
        self._offsets = np.concatenate([[0], np.cumsum(self._counts)[:-1]]).astype(int).tolist()
        self.workers = max(1, self.cfg.num_workers)
        shares = assign_shares(len(names), world_size * self.workers)
        self._shares = shares[rank * self.workers : (rank + 1) * self.workers]
        self.num_samples = sum(s.count(self._counts[s.shard]) for slot in self._shares for s in slot)
        self.skipped_samples = 0
        self.skipped_shards = 0
        self.last_keys: list[str] = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.skipped_samples = self.skipped_shards = 0
        dataset = _EvalStream(self._urls, self._counts, self._offsets, self._shares, self.geometry)
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_unchanged,
            worker_init_fn=_init_worker,
        )
        pending: list[dict] = []
        iterator = iter(loader)
        try:
            for item, meta in iterator:
                self.skipped_samples += meta["skipped_samples"]
                self.skipped_shards += meta["skipped_shards"]
                if item is None:
                    continue
                pending.append(item)
                if len(pending) == self.batch_size:
                    yield self._collate(pending)
                    pending = []
        finally:
            _stop_workers(iterator)
        if pending:
            yield self._collate(pending)

    def _collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        labels = torch.zeros(len(items), self.geometry.num_classes, dtype=torch.float32)
        for row, item in enumerate(items):
            labels[row, item["labels"]] = 1.0
        self.last_keys = [item["key"] for item in items]
        return {
            "clean": torch.stack([item["clean"] for item in items]).float().unsqueeze(1),
            "labels": labels,
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
            "valid_frames": torch.tensor([item["valid_frames"] for item in items], dtype=torch.long),
        }
