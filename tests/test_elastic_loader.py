"""Elastic data continuation (pipeline.shares.resume_positions): the rest of an epoch saved on W ranks x
workers is served on another layout with every sample exactly once, and its own restarts are exact."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipeline.loader import TrainLoader
from pipeline.shares import deal_rests, resume_positions
from test_loader import G, MICRO_BATCH, NUM_SHARDS, PER_SHARD, _cfg, _run, shard_set  # noqa: F401 (fixture)

EPOCH, SEED = 1, 5


def _keys(batches) -> list[str]:
    return [key for keys, _ in batches for key in keys]


def _head(directory, ranks: int, workers: int, stop: int) -> tuple[list[str], list[dict]]:
    """Every rank of a `ranks` x `workers` run serves `stop` batches; (their keys, their positions as JSON)."""
    keys, positions = [], []
    for rank in range(ranks):
        loader = TrainLoader(_cfg(directory, workers), "train", rank, ranks, epoch=EPOCH, seed=SEED)
        keys += _keys(_run(loader, stop_after=stop))
        positions.append(json.loads(json.dumps(loader.state_dict())))
    return keys, positions


@pytest.mark.parametrize(("before", "after", "stop"), [((2, 0), (1, 0), 1), ((1, 0), (2, 0), 2), ((2, 0), (3, 0), 1),
                                                       ((2, 2), (3, 1), 1), ((1, 2), (2, 0), 3)])
def test_the_rest_of_the_epoch_is_served_once_on_another_layout(shard_set, before, after, stop):
    directory, _ = shard_set
    head, positions = _head(directory, *before, stop)
    ranks, workers = after
    tail, dropped = [], 0
    for rank, position in enumerate(resume_positions(positions, ranks, workers)):
        loader = TrainLoader(_cfg(directory, workers), "train", rank, ranks, epoch=EPOCH, seed=SEED,
                             start_position=position)
        tail += _keys(_run(loader))
        dropped += loader.dropped_samples
    served = Counter(head + tail)
    assert max(served.values()) == 1, [k for k, n in served.items() if n > 1]
    assert all("-e01-" in key for key in served)
    # What the new layout cannot split into equal whole batches per rank is dropped and counted, nothing else.
    assert len(served) + dropped == NUM_SHARDS * PER_SHARD


def test_a_restart_inside_the_elastic_rest_is_exact(shard_set):
    directory, _ = shard_set
    _, positions = _head(directory, 2, 0, 1)
    elastic = resume_positions(positions, 1, 2)
    cfg = _cfg(directory, 2)
    full = _keys(_run(TrainLoader(cfg, "train", 0, 1, epoch=EPOCH, seed=SEED, start_position=elastic[0])))
    interrupted = TrainLoader(cfg, "train", 0, 1, epoch=EPOCH, seed=SEED, start_position=elastic[0])
    head = _keys(_run(interrupted, stop_after=2))
    saved = json.loads(json.dumps(interrupted.state_dict()))
    assert resume_positions([saved], 1, 2) == [saved]
    tail = _keys(_run(TrainLoader(cfg, "train", 0, 1, epoch=EPOCH, seed=SEED, start_position=saved)))
    assert head + tail == full and len(full) > 2


def test_three_layouts_in_one_epoch_serve_every_sample_once(shard_set):
    """2 ranks -> 1 rank x 2 workers -> 3 ranks, each serving a part of the same epoch."""
    directory, _ = shard_set
    served, positions = _head(directory, 2, 0, 1)
    second = []
    for rank, position in enumerate(resume_positions(positions, 1, 2)):
        loader = TrainLoader(_cfg(directory, 2), "train", rank, 1, epoch=EPOCH, seed=SEED, start_position=position)
        served += _keys(_run(loader, stop_after=1))
        second.append(json.loads(json.dumps(loader.state_dict())))
    dropped = 0
    for rank, position in enumerate(resume_positions(second, 3, 0)):
        assert len(position["history"]) == 2
        loader = TrainLoader(_cfg(directory, 0), "train", rank, 3, epoch=EPOCH, seed=SEED, start_position=position)
        served += _keys(_run(loader))
        dropped += loader.dropped_samples
    counts = Counter(served)
    assert max(counts.values()) == 1
    assert len(counts) + dropped == NUM_SHARDS * PER_SHARD and len(counts) > 2 * MICRO_BATCH // G


def test_positions_of_another_epoch_or_seed_are_refused(shard_set):
    directory, _ = shard_set
    _, positions = _head(directory, 2, 0, 1)
    elastic = resume_positions(positions, 1, 0)
    with pytest.raises(ValueError, match="epoch: saved 1, now 2"):
        TrainLoader(_cfg(directory, 0), "train", 0, 1, epoch=2, seed=SEED, start_position=elastic[0])


def test_rests_are_cut_into_equal_contiguous_ranges():
    assert deal_rests([3, 3], 3) == [[(0, 0, 2)], [(0, 2, 1), (1, 0, 1)], [(1, 1, 2)]]
    assert deal_rests([5, 0, 2], 2) == [[(0, 0, 3)], [(0, 3, 2), (2, 0, 2)]]
    dealt = deal_rests([7, 1, 4, 9], 5)
    sizes = [sum(count for _, _, count in pieces) for pieces in dealt]
    assert sum(sizes) == 21 and max(sizes) - min(sizes) <= 1
