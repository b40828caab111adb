"""WebDataset input (pipeline.loader, pipeline.eval_loader and the modules they read through): rank/worker split, equal batch counts, broken shards, restart, eval."""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.train.distributed import any_rank
from pipeline import mixing, shards, storage
from pipeline.config import LoaderConfig
from pipeline.eval_loader import EvalLoader
from pipeline.loader import TrainLoader
from pipeline.plan import sample_key, shard_name
from pipeline.shard_source import ShardSource
from pipeline.shares import assign_shares

T, F, PATCH, G = 64, 16, 16, 3
TP = T // PATCH
ROWS = mixing.nomix_rows(TP)
NUM_SHARDS, PER_SHARD, EPOCHS = 5, 3, 2
EVAL_SHARDS = (5, 3)
CLASSES = 4
MICRO_BATCH = 2 * G


def _group(epoch: int, shard: int, sample: int) -> dict:
    """The deterministic content of one mixture group."""
    rng = np.random.default_rng([epoch, shard, sample])
    clips = rng.normal(-4.0, 3.0, size=(G, T, F)).astype(np.float16)
    windows = [mixing.draw_windows(TP, ROWS, rng) for _ in range(G)]
    labels = [sorted(rng.choice(CLASSES, size=1 + i % 2, replace=False).tolist()) for i in range(G)]
    nomix = torch.from_numpy(np.stack([mixing.nomix_mask(i1, i2, ROWS, TP) for i1, i2 in windows]))
    partner = torch.tensor(mixing.group_cycle(G))
    mixed = mixing.logmel_max_batch(torch.from_numpy(clips).float(), partner, nomix, PATCH).numpy()
    return {"clips": clips, "windows": windows, "labels": labels, "mixed": mixed.astype(np.float16)}


def write_shard_set(directory: Path, materialize: bool = True, epochs: int = EPOCHS) -> dict[str, dict]:
    """A small shard set (train: mix groups, eval: single clips) with index.parquet and dataset.json.

    Returns the content of every sample by key."""
    truth: dict[str, dict] = {}
    index_rows: list[dict] = []
    per_epoch: dict[str, list[str]] = {}
    for epoch in range(epochs):
        names = []
        for shard in range(NUM_SHARDS):
            samples = []
            for sample in range(PER_SHARD):
                key = sample_key("train", epoch, shard, sample)
                group = _group(epoch, shard, sample)
                members = shards.encode_sample(
                    group["clips"], [f"{key}-clip{i}" for i in range(G)], group["labels"], [False] * G,
                    group["windows"], ROWS, "logmel_max", seed=epoch,
                    mixtures=group["mixed"] if materialize else None,
                )
                samples.append((key, members))
                truth[key] = group
            name = shard_name("train", epoch, shard)
            shards.write_shard(samples, storage.locate(directory), name)
            index_rows += shards.index_rows(name, samples)
            names.append(name)
        per_epoch[str(epoch)] = names
    eval_names = []
    running = 0
    for shard, count in enumerate(EVAL_SHARDS):
        samples = []
        for sample in range(count):
            key = sample_key("eval", 0, shard, sample)
            rng = np.random.default_rng([99, shard, sample])
            clip = rng.normal(size=(T, F)).astype(np.float16)
            labels = sorted(rng.choice(CLASSES, size=1 + sample % 3, replace=False).tolist())
            samples.append((key, shards.encode_eval_sample(clip, f"clip-{running}", labels)))
            truth[key] = {"clip": clip, "labels": labels, "index": running}
            running += 1
        name = shard_name("eval", 0, shard)
        shards.write_shard(samples, storage.locate(directory), name)
        index_rows += shards.index_rows(name, samples)
        eval_names.append(name)
    storage.locate(directory).write_table("index.parquet", shards.index_table(index_rows))
    info = {
        "splits": {
            "train": {"mix": True, "shards_per_epoch": per_epoch, "samples": NUM_SHARDS * PER_SHARD},
            "eval": {"mix": False, "shards_per_epoch": {"0": eval_names}, "samples": sum(EVAL_SHARDS)},
        },
        "group_size": G, "r": ROWS, "mixture_epochs": epochs, "target_length": T, "mel_bins": F, "patch_size": PATCH,
        "classes": [{"index": i, "mid": f"/m/{i}", "name": f"class {i}"} for i in range(CLASSES)],
        "materialize_mixtures": materialize, "fingerprint": "test",
    }
    (directory / "dataset.json").write_text(json.dumps(info))
    return truth


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("shards")
    return directory, write_shard_set(directory)


@pytest.fixture(scope="module")
def clips_only_set(tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("clips_only")
    return directory, write_shard_set(directory, materialize=False)


def _cfg(directory: Path, workers: int = 0, buffer: int = 4) -> LoaderConfig:
    return LoaderConfig(
        shards=str(directory), micro_batch_clips=MICRO_BATCH, num_workers=workers, shuffle_buffer=buffer
    )


def _run(loader: TrainLoader, stop_after: int | None = None) -> list[tuple[list[str], dict]]:
    out = []
    iterator = iter(loader)
    for batch in iterator:
        out.append((list(loader.last_keys), batch))
        if stop_after is not None and len(out) == stop_after:
            iterator.close()
            break
    return out


def test_assign_shares_gives_every_sample_to_exactly_one_slot() -> None:
    rng = np.random.default_rng(0)
    for shards_count in range(1, 10):
        for slots in range(1, 8):
            counts = rng.integers(0, 7, size=shards_count).tolist()
            owners: dict[tuple[int, int], int] = {}
            readers = [0] * shards_count
            for slot, shares in enumerate(assign_shares(shards_count, slots)):
                for share in shares:
                    readers[share.shard] += 1
                    for ordinal in range(counts[share.shard]):
                        if ordinal % share.parts == share.part:
                            assert (share.shard, ordinal) not in owners
                            owners[(share.shard, ordinal)] = slot
            assert len(owners) == sum(counts)
            remainder = shards_count % slots or slots
            assert max(readers) <= -(-slots // remainder)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_split_the_epoch_disjointly_with_equal_batch_counts(shard_set, workers, caplog) -> None:
    directory, _ = shard_set
    caplog.set_level(logging.INFO, logger="pipeline.loader")
    served: list[str] = []
    counts, dropped = [], 0
    for rank in range(2):
        loader = TrainLoader(_cfg(directory, workers), "train", rank, 2, epoch=0, seed=5)
        batches = _run(loader)
        counts.append(len(batches))
        served += [key for keys, _ in batches for key in keys]
        dropped += loader.dropped_samples
        assert not loader.exhausted and loader.skipped_samples == 0 == loader.skipped_shards
    total = NUM_SHARDS * PER_SHARD
    assert counts[0] == counts[1] == 3  # rank 0 has 8 samples, rank 1 has 7: 3 batches of 2 groups each
    assert len(served) == len(set(served)) == 12
    assert all("-e00-" in key for key in served)
    assert len(served) + dropped == total
    assert any("dropped" in record.getMessage() for record in caplog.records)


def test_batch_contract_matches_the_stored_samples(shard_set) -> None:
    directory, truth = shard_set
    loader = TrainLoader(_cfg(directory), "train", 0, 1, epoch=0, seed=1)
    batches = _run(loader)
    assert len(batches) == loader.num_batches == 7 and loader.dropped_samples == 1
    for keys, batch in batches:
        assert set(batch) == {"clean", "mixed", "partner", "nomix", "valid_frames"}
        assert batch["valid_frames"].tolist() == [T] * MICRO_BATCH  # these shards predate "frames": full length
        assert batch["clean"].shape == batch["mixed"].shape == (MICRO_BATCH, 1, T, F)
        assert batch["clean"].dtype == batch["mixed"].dtype == torch.float32
        assert batch["partner"].dtype == torch.long and batch["partner"].shape == (MICRO_BATCH,)
        assert batch["nomix"].dtype == torch.bool and batch["nomix"].shape == (MICRO_BATCH, TP)
        for g, key in enumerate(keys):
            group, rows = truth[key], slice(g * G, (g + 1) * G)
            assert torch.equal(batch["clean"][rows, 0], torch.from_numpy(group["clips"]).float())
            assert torch.equal(batch["mixed"][rows, 0], torch.from_numpy(group["mixed"]).float())
            assert batch["partner"][rows].tolist() == [g * G + (i - 1) % G for i in range(G)]
            for i, (i1, i2) in enumerate(group["windows"]):
                assert batch["nomix"][g * G + i].tolist() == mixing.nomix_mask(i1, i2, ROWS, TP).tolist()
        # The mixture of row i is its primary on the no-mix rows and max(primary, partner) elsewhere.
        clean, mixed = batch["clean"][:, 0], batch["mixed"][:, 0]
        frames = batch["nomix"].repeat_interleave(PATCH, dim=1)[..., None]
        expected = torch.where(frames, clean, torch.maximum(clean, clean[batch["partner"]]))
        assert torch.equal(mixed, expected)


def test_mixtures_formed_on_the_fly_equal_the_materialised_ones(shard_set, clips_only_set) -> None:
    stored = _run(TrainLoader(_cfg(shard_set[0]), "train", 0, 1, epoch=1, seed=3))
    formed = _run(TrainLoader(_cfg(clips_only_set[0]), "train", 0, 1, epoch=1, seed=3))
    assert len(stored) == len(formed) == 7
    for (keys_a, a), (keys_b, b) in zip(stored, formed):
        assert keys_a == keys_b
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_shuffle_is_seeded_per_epoch_and_epochs_cycle_mixture_epochs(shard_set) -> None:
    directory, _ = shard_set

    def order(epoch: int, seed: int) -> list[str]:
        batches = _run(TrainLoader(_cfg(directory), "train", 0, 1, epoch=epoch, seed=seed))
        return [key for keys, _ in batches for key in keys]

    first = order(0, 7)
    assert order(0, 7) == first
    assert order(0, 8) != first
    second, third = order(1, 7), order(2, 7)
    assert all("-e01-" in key for key in second)
    assert all("-e00-" in key for key in third)  # epoch 2 reads mixture epoch 2 mod 2 = 0
    assert third != first


@pytest.mark.parametrize(("workers", "world_size", "stops"), [(2, 1, (1, 3, 6)), (0, 2, (2,))])
def test_restart_continues_the_epoch_exactly(shard_set, workers, world_size, stops) -> None:
    directory, _ = shard_set
    cfg = _cfg(directory, workers)
    full = _run(TrainLoader(cfg, "train", 0, world_size, epoch=3, seed=11))
    for stop in stops:
        interrupted = TrainLoader(cfg, "train", 0, world_size, epoch=3, seed=11)
        head = _run(interrupted, stop_after=stop)
        position = json.loads(json.dumps(interrupted.state_dict()))
        resumed = TrainLoader(cfg, "train", 0, world_size, epoch=3, seed=11, start_position=position)
        assert len(resumed) == len(full) - stop
        tail = _run(resumed)
        assert [keys for keys, _ in head + tail] == [keys for keys, _ in full]
        for (_, a), (_, b) in zip(tail, full[stop:]):
            assert all(torch.equal(a[name], b[name]) for name in a)
    with pytest.raises(ValueError, match="does not belong"):
        TrainLoader(cfg, "train", 0, world_size, epoch=4, seed=11, start_position=position)


def test_broken_shards_and_members_are_skipped_and_counted(shard_set, tmp_path, caplog) -> None:
    source, truth = shard_set
    for path in source.iterdir():
        shutil.copy(path, tmp_path / path.name)
    # Shard 1: cut inside the first clip of its second sample (sample 0 survives, 1 and 2 are lost).
    truncated = tmp_path / shard_name("train", 0, 1)
    with tarfile.open(truncated) as archive:
        member = archive.getmember(f"{sample_key('train', 0, 1, 1)}.c0.npy")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: member.offset_data + member.size // 2])
    # Shard 3: garbage bytes in c1.npy of its first sample.
    samples = shards.read_shard_samples(tmp_path / shard_name("train", 0, 3))
    samples[0][1]["c1.npy"] = b"garbage bytes, not an npy array"
    (tmp_path / shard_name("train", 0, 3)).unlink()
    shards.write_shard(samples, storage.locate(tmp_path), shard_name("train", 0, 3))

    caplog.set_level(logging.WARNING, logger="pipeline.share_reader")
    loader = TrainLoader(_cfg(tmp_path), "train", 0, 1, epoch=0, seed=2)
    batches = _run(loader)
    bad = {sample_key("train", 0, 1, 1), sample_key("train", 0, 1, 2), sample_key("train", 0, 3, 0)}
    good = {key for key in truth if "train-e00-" in key} - bad
    served = [key for keys, _ in batches for key in keys]
    assert sorted(served) == sorted(good)  # 12 good samples: 6 whole batches
    assert loader.skipped_samples == 3 and loader.skipped_shards == 1
    assert loader.exhausted and loader.num_batches == 7 and len(batches) == 6
    assert len(served) + loader.skipped_samples + loader.dropped_samples == NUM_SHARDS * PER_SHARD
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert shard_name("train", 0, 1) in messages and sample_key("train", 0, 3, 0) in messages


def test_shard_patterns_restrict_the_shard_list(shard_set, tmp_path) -> None:
    directory, _ = shard_set
    braces = ShardSource(f"{directory}/train-e00-{{000000..000002}}.tar")
    assert braces.shard_names("train", 0) == [shard_name("train", 0, s) for s in range(3)]
    wildcard = ShardSource(f"{directory}/train-e01-*.tar")
    assert wildcard.shard_names("train", 1) == [shard_name("train", 1, s) for s in range(NUM_SHARDS)]
    assert ShardSource(f"file://{directory}").sample_counts([shard_name("eval", 0, 1)]) == [EVAL_SHARDS[1]]
    with pytest.raises(ValueError, match="not in"):
        ShardSource(str(directory)).split("validation")
    # Without index.parquet the counts come from the tar headers.
    names = [shard_name("train", 0, s) for s in range(NUM_SHARDS)] + [shard_name("eval", 0, s) for s in range(2)]
    for name in names + ["dataset.json"]:
        shutil.copy(directory / name, tmp_path / name)
    assert ShardSource(str(tmp_path)).sample_counts(names) == [PER_SHARD] * NUM_SHARDS + list(EVAL_SHARDS)


def test_eval_loader_labels_and_index(shard_set) -> None:
    directory, truth = shard_set
    evaluation = {v["index"]: v for k, v in truth.items() if k.startswith("eval-")}
    loader = EvalLoader(_cfg(directory), "eval", batch_size=3)
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [3, 3, 2]
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(sum(EVAL_SHARDS)))
    for batch in batches:
        assert set(batch) == {"clean", "labels", "index", "valid_frames"} and batch["labels"].shape[1] == CLASSES
        assert batch["valid_frames"].tolist() == [T] * len(batch["index"])
        for row, i in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["clean"][row, 0], torch.from_numpy(evaluation[i]["clip"]).float())
            assert torch.nonzero(batch["labels"][row]).flatten().tolist() == evaluation[i]["labels"]
    split = [torch.cat([b["index"] for b in EvalLoader(_cfg(directory, 2), "eval", r, 2, 4)]) for r in range(2)]
    assert sorted(torch.cat(split).tolist()) == list(range(sum(EVAL_SHARDS)))


def _exhausted_on_rank(rank: int, store: str, results) -> None:
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(store, 2), rank=rank, world_size=2)
    results.put((rank, any_rank(rank == 1, "cpu"), any_rank(False, "cpu")))
    torch.distributed.destroy_process_group()


def test_any_rank_is_true_on_every_rank_when_one_flag_is(tmp_path) -> None:
    assert any_rank(True, "cpu") and not any_rank(False, "cpu")
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    store = str(tmp_path / "store")
    processes = [context.Process(target=_exhausted_on_rank, args=(r, store, results)) for r in range(2)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert outcomes == [(0, True, False), (1, True, False)]
