"""The training input: `TrainLoader` reads mixture epoch `epoch mod K` of a split for one rank and yields the
batch contract of DESIGN.md ("Training batch"): {clean, mixed, partner, nomix, valid_frames}, tensors only;
`loader.last_keys` holds the sample keys of the last batch.

How a training epoch is split. The epoch's shards are permuted with (seed, epoch) and dealt to the
(rank, worker) slots (`pipeline.shares`). A slot shuffles its samples with a buffer seeded by (seed, epoch,
rank, worker), before decoding, then decodes them and forms batches of micro_batch_clips / G groups inside
its worker (`pipeline.share_reader`); a worker's partial last batch is not served.

A rank takes its workers' batches round-robin (the torch DataLoader order). Every rank stops after the
same number of batches, the minimum over ranks of the planned counts, so no rank is left waiting in a
collective; the samples left unserved are `dropped_samples` (logged). A rank that runs short anyway
(corrupt data) ends its iterator early and sets `exhausted`; the training job's per-update reduction of
its control flags lets every rank stop at the same step.

Position: `state_dict()` records, per worker, how many raw samples it has passed (bad ones included) and
which worker is next. A loader built with `start_position` makes each worker read and shuffle that many
samples again without decoding them, then continues: the rest of the epoch is exactly that of an
uninterrupted run. A position belongs to one rank of one layout (world size x workers); another layout
takes the positions that `pipeline.shares.resume_positions` makes of it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from pipeline.config import DataConfig, LoaderConfig
from pipeline.shard_source import ShardSource
from pipeline.shards import ShardFormatError
from pipeline.shardset import DATASET_INFO
from pipeline.share_reader import (
    Geometry,
    Skips,
    check_raw_sample,
    collate_groups,
    data_config,
    dataset_geometry,
    decode_group,
    derive_seed,
    init_worker,
    read_shares,
    stop_workers,
    unchanged,
)
from pipeline.shares import Share, assign_shares, deal_rests

logger = logging.getLogger(__name__)

POSITION_VERSION = 2  # 2: per-worker counts are raw samples passed (1 counted decoded ones)


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
        geometry: Geometry,
        groups_per_batch: int,
        shuffle_buffer: int,
        worker_offset: int,
    ) -> None:
        self.urls, self.counts, self.plans = urls, counts, plans
        self.geometry, self.groups_per_batch = geometry, groups_per_batch
        self.shuffle_buffer, self.worker_offset = shuffle_buffer, worker_offset

    def _raw(self, slot: _Slot, skips: Skips) -> Iterator[dict]:
        if slot.replays is None:
            buffer = max(1, self.shuffle_buffer)
            raw = read_shares(self.urls, slot.shares, self.counts, skips)
            yield from shuffle(buffer, buffer, rng=random.Random(slot.shuffle_seed))(raw)
            return
        for replay in slot.replays:
            # What an earlier slot read is not this worker's to count (its part of it is counted on decode).
            samples = self._raw(replay.source, Skips())
            collections.deque(itertools.islice(samples, replay.skip), maxlen=0)
            yield from itertools.islice(samples, replay.take)

    def __iter__(self) -> Iterator[tuple[dict | None, dict]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.worker_offset) % len(self.plans)
        plan = self.plans[worker]
        if plan.finished:
            return
        skips = Skips()
        raw = self._raw(plan.slot, skips)
        collections.deque(itertools.islice(raw, plan.skip), maxlen=0)
        consumed = plan.skip
        groups: list[dict] = []
        keys: list[str] = []
        for sample in raw:
            consumed += 1
            try:
                check_raw_sample(sample)
                groups.append(decode_group(sample, self.geometry))
            except ShardFormatError as error:
                skips.bad_sample(sample["__key__"], sample["__url__"], error)
                continue
            keys.append(sample["__key__"])
            if len(groups) == self.groups_per_batch:
                batch = collate_groups(groups, self.geometry)
                yield batch, self._meta(worker, consumed, keys, skips)
                groups, keys = [], []
        yield None, self._meta(worker, consumed, [], skips)

    @staticmethod
    def _meta(worker: int, consumed: int, keys: list[str], skips: Skips) -> dict:
        samples, shards = skips.take()
        return {"worker": worker, "consumed": consumed, "keys": list(keys), "skipped_samples": samples,
                "skipped_shards": shards}


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
        self.cfg, mix_padding = data_config(cfg)
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
        self.geometry = dataset_geometry(self.source, mix_padding)
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
        order = np.random.default_rng(derive_seed(self.seed, epoch)).permutation(len(names))
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
        slots = [_Slot(shares[j], derive_seed(self.seed, self.epoch, j // workers, j % workers))
                 for j in range(len(shares))]
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
            self._dataset(), batch_size=None, num_workers=self.cfg.num_workers, collate_fn=unchanged,
            pin_memory=self.pin_memory, worker_init_fn=init_worker,
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
            stop_workers(iterator)
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
