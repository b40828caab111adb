"""Training loader throughput: clips/s for 1 and 2 DataLoader workers, with stored and with on-the-fly mixtures.

Writes `--groups` synthetic mixture groups (G clips of (T, F) float16 each) into shards in a temporary
folder, then reads one full epoch per setting (world size 1) after one warm-up epoch, and prints one JSON line.

    .venv/bin/python -m benchmarks.loader [--groups 200] [--target-length 1024] [--mel-bins 128]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import mixing, shards, storage
from pipeline.config import LoaderConfig
from pipeline.loader import TrainLoader
from pipeline.plan import sample_key, shard_name

PATCH = 16


def write_groups(directory: Path, args: argparse.Namespace, materialize: bool) -> None:
    """`args.groups` random groups in shards of `args.groups_per_shard`, index.parquet and dataset.json."""
    time_patches = args.target_length // PATCH
    rows = mixing.nomix_rows(time_patches)
    rng = np.random.default_rng(0)
    partner = torch.tensor(mixing.group_cycle(args.group_size))
    names, index_rows = [], []
    for shard_start in range(0, args.groups, args.groups_per_shard):
        shard = shard_start // args.groups_per_shard
        samples = []
        for sample in range(min(args.groups_per_shard, args.groups - shard_start)):
            clips = rng.normal(-4.0, 3.0, size=(args.group_size, args.target_length, args.mel_bins)).astype(np.float16)
            windows = [mixing.draw_windows(time_patches, rows, rng) for _ in range(args.group_size)]
            mixed = None
            if materialize:
                nomix = torch.from_numpy(np.stack([mixing.nomix_mask(a, b, rows, time_patches) for a, b in windows]))
                mixed = mixing.logmel_max_batch(torch.from_numpy(clips).float(), partner, nomix, PATCH).numpy()
            key = sample_key("train", 0, shard, sample)
            members = shards.encode_sample(
                clips, [f"{key}-{i}" for i in range(args.group_size)], [[0]] * args.group_size,
                [False] * args.group_size, windows, rows, "logmel_max", seed=0, mixtures=mixed,
            )
            samples.append((key, members))
        name = shard_name("train", 0, shard)
        shards.write_shard(samples, storage.locate(directory), name)
        index_rows += shards.index_rows(name, samples)
        names.append(name)
    storage.locate(directory).write_table("index.parquet", shards.index_table(index_rows))
    info = {
        "splits": {"train": {"mix": True, "shards_per_epoch": {"0": names}, "samples": args.groups}},
        "group_size": args.group_size, "r": rows, "mixture_epochs": 1, "target_length": args.target_length,
        "mel_bins": args.mel_bins, "patch_size": PATCH, "classes": [{"index": 0, "mid": "/m/0", "name": "x"}],
        "materialize_mixtures": materialize, "fingerprint": "benchmark",
    }
    (directory / "dataset.json").write_text(json.dumps(info))


def read_epoch(directory: Path, workers: int, args: argparse.Namespace) -> tuple[int, float]:
    """(clips served, seconds) for one epoch, DataLoader start-up included."""
    cfg = LoaderConfig(
        shards=str(directory), micro_batch_clips=args.micro_batch_clips, num_workers=workers,
        shuffle_buffer=args.shuffle_buffer,
    )
    start = time.perf_counter()
    clips = sum(batch["clean"].shape[0] for batch in TrainLoader(cfg, "train", 0, 1, epoch=0, seed=0))
    return clips, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--target-length", type=int, default=1024)
    parser.add_argument("--mel-bins", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=3)
    parser.add_argument("--groups-per-shard", type=int, default=16)
    parser.add_argument("--micro-batch-clips", type=int, default=12)
    parser.add_argument("--shuffle-buffer", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as temporary:
        for materialize in (True, False):
            directory = Path(temporary) / ("materialised" if materialize else "clips_only")
            directory.mkdir()
            start = time.perf_counter()
            write_groups(directory, args, materialize)
            write_s = time.perf_counter() - start
            size = sum(f.stat().st_size for f in directory.iterdir())
            read_epoch(directory, args.workers[0], args)  # warm-up: page cache, imports
            for workers in args.workers:
                clips, seconds = read_epoch(directory, workers, args)
                results.append({
                    "materialized": materialize, "workers": workers, "clips": clips, "seconds": round(seconds, 3),
                    "clips_per_s": round(clips / seconds, 1),
                    "clips_per_s_per_worker": round(clips / seconds / workers, 1),
                    "shard_mib": round(size / 2**20, 1), "write_s": round(write_s, 2),
                })
    print(json.dumps({
        "benchmark": "loader", "groups": args.groups, "group_size": args.group_size,
        "shape": [args.target_length, args.mel_bins], "micro_batch_clips": args.micro_batch_clips,
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "results": results,
    }))


if __name__ == "__main__":
    main()
