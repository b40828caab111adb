"""The evaluation input: `EvalLoader` yields {clean, labels, index, valid_frames} batches of a split in shard
order, unshuffled and with nothing dropped; with world_size > 1 each rank reads a disjoint part (the
training split scheme of `pipeline.shares`, unshuffled).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig, LoaderConfig
from pipeline.shard_source import ShardSource
from pipeline.shards import ShardFormatError, decode_sample
from pipeline.shardset import DATASET_INFO
from pipeline.share_reader import (
    Geometry,
    Skips,
    check_raw_sample,
    data_config,
    dataset_geometry,
    init_worker,
    read_shares,
    stop_workers,
    unchanged,
    valid_frame_counts,
)
from pipeline.shares import Share, assign_shares


class _EvalStream(IterableDataset):
    """Workers of one rank's evaluation pass; each yields (clip, meta) per clip and a final (None, meta)."""

    def __init__(
        self, urls: list[str], counts: list[int], offsets: list[int], shares: list[list[Share]], geometry: Geometry
    ) -> None:
        self.urls, self.counts, self.offsets, self.shares, self.geometry = urls, counts, offsets, shares, geometry

    def __iter__(self) -> Iterator[tuple[dict | None, dict]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        skips = Skips()
        geometry = self.geometry
        for sample in read_shares(self.urls, self.shares[worker], self.counts, skips):
            key, url = sample["__key__"], sample["__url__"]
            try:
                check_raw_sample(sample)
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
        self.cfg, mix_padding = data_config(cfg)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.split, self.rank, self.world_size = split, rank, world_size
        self.batch_size = batch_size or self.cfg.micro_batch_clips
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.source = ShardSource(self.cfg.shards)
        self.geometry = dataset_geometry(self.source, mix_padding)
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
            dataset, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=unchanged,
            worker_init_fn=init_worker,
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
            stop_workers(iterator)
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
