"""Small synthetic shard sets for training tests: real shard format, structured random log-mels, no Ray.

Each clip is a few horizontal bands (tones) over a noise floor, so a tiny model has something to learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline import mixing, shards, storage
from pipeline.plan import sample_key, shard_name


def _clip(rng: np.random.Generator, frames: int, bins: int) -> np.ndarray:
    clip = rng.normal(-10.0, 1.0, size=(frames, bins))
    for _ in range(rng.integers(1, 4)):
        band = int(rng.integers(0, bins))
        start = int(rng.integers(0, frames // 2))
        clip[start : start + int(rng.integers(frames // 4, frames)), band] += 8.0
    return clip.astype(np.float16)


def write_training_set(
    directory: Path,
    target_length: int,
    mel_bins: int,
    group_size: int = 3,
    num_shards: int = 3,
    groups_per_shard: int = 4,
    mixture_epochs: int = 1,
    patch_size: int = 16,
    seed: int = 0,
) -> dict:
    """Write `train` shards (+ index.parquet, dataset.json) in the preprocessing job's layout; return dataset.json."""
    directory.mkdir(parents=True, exist_ok=True)
    time_patches = target_length // patch_size
    rows = mixing.nomix_rows(time_patches)
    index_rows, per_epoch = [], {}
    for epoch in range(mixture_epochs):
        names = []
        for shard in range(num_shards):
            samples = []
            for sample in range(groups_per_shard):
                rng = np.random.default_rng([seed, epoch, shard, sample])
                clips = np.stack([_clip(rng, target_length, mel_bins) for _ in range(group_size)])
                windows = [mixing.draw_windows(time_patches, rows, rng) for _ in range(group_size)]
                nomix = torch.from_numpy(np.stack([mixing.nomix_mask(a, b, rows, time_patches) for a, b in windows]))
                partner = torch.tensor(mixing.group_cycle(group_size))
                mixed = mixing.logmel_max_batch(torch.from_numpy(clips).float(), partner, nomix, patch_size)
                key = sample_key("train", epoch, shard, sample)
                clip_keys = [f"s{shard}g{sample}c{i}" for i in range(group_size)]
                labels = [[i % 4] for i in range(group_size)]
                members = shards.encode_sample(
                    clips, clip_keys, labels, [False] * group_size, windows, rows, "logmel_max", seed=seed,
                    mixtures=mixed.numpy().astype(np.float16),
                )
                samples.append((key, members))
            name = shard_name("train", epoch, shard)
            shards.write_shard(samples, storage.locate(directory), name)
            index_rows += shards.index_rows(name, samples)
            names.append(name)
        per_epoch[str(epoch)] = names
    storage.locate(directory).write_table("index.parquet", shards.index_table(index_rows))
    info = {
        "splits": {"train": {"mix": True, "shards_per_epoch": per_epoch, "samples": num_shards * groups_per_shard}},
        "group_size": group_size,
        "r": rows,
        "mixture_epochs": mixture_epochs,
        "target_length": target_length,
        "mel_bins": mel_bins,
        "patch_size": patch_size,
        "classes": [{"index": i, "mid": f"/m/c{i}", "name": f"class {i}"} for i in range(4)],
        "materialize_mixtures": True,
        "fingerprint": f"synthetic-{seed}",
    }
    (directory / "dataset.json").write_text(json.dumps(info))
    return info
