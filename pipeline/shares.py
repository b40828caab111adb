"""Which (rank, worker) slot reads which samples of an epoch, and how a saved position carries over to another
layout.

Every rank computes the same plan up front from `dataset.json` and the per-shard sample counts. The
epoch's shards (permuted with (seed, epoch) by the train loader) are dealt to S = world_size x W slots,
slot = rank * W + worker, W = max(1, num_workers). The first S * floor(n / S) shards go whole,
round-robin. Each of the m = n mod S remaining shards (all of them when n < S) is shared by the slots j
with j mod m equal to its position, and such a slot takes the samples whose ordinal in the shard is
congruent to its share index modulo the number of sharers (`assign_shares`). Every sample belongs to
exactly one slot, and a shard is read by at most ceil(S / m) slots.

Another layout mid-epoch (elastic resume): `resume_positions` turns the positions of every rank of the
saved layout into start positions for the new one, carrying the saved ones in `history`. The rests of
the saved slots, laid end to end, are cut into one contiguous range per new slot (`deal_rests`); a new
slot replays the streams its range touches (at most a few), passes over what they had consumed and takes
its range, so every sample of the epoch is still served once (or dropped and counted where the ranks'
batch counts must be equalised). Layouts can change again inside the same epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


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
