"""The fine-tuning job's data: a labelled split held in memory, each epoch's clip order, per-update batches.

The train split (a `mix: false` split of the preprocessing job's shards) is read once through
pipeline.eval_loader.EvalLoader: raw fbank, multi-hot labels and sample keys, held in memory or, with
`finetune.cache_dir`, in a memory-mapped clip cache on disk (jobs.train.finetune_cache). Random access makes the clip order a pure
function of (seed, epoch): a permutation, or (`finetune.sampling: weighted`, the reference's AS-2M sampling)
`clips_per_epoch` clips drawn without replacement by torch.multinomial over per-clip weights. Update u takes
the next `clips per update` clips of its epoch's order, rank r and micro-step m their slice, so a resumed run
replays exactly the batches of an uninterrupted one with no loader state to save.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from jobs.train.config import ConfigError
from jobs.train.finetune_cache import LabelledClips, load_cached
from pipeline.config import DataConfig


def load_split(data: DataConfig, location: str, split: str, batch_size: int = 256,
               cache_dir: str = "") -> LabelledClips:
    """Every clip of `split` at `location`, in the split's order; with `cache_dir`, from (and first into) a
    clip cache there (jobs.train.finetune_cache)."""
    from pipeline.eval_loader import EvalLoader

    loader_cfg = dataclasses.replace(data.loader, shards=location)
    try:
        loader = EvalLoader(dataclasses.replace(data, loader=loader_cfg), split, batch_size=batch_size)
        if cache_dir:
            return load_cached(loader, split, cache_dir)
        fbank, labels, keys = [], [], []
        for batch in loader:
            fbank.append(batch["clean"].half())
            labels.append(batch["labels"])
            keys += loader.last_keys
    except ConfigError:
        raise
    except (FileNotFoundError, KeyError, ValueError) as error:
        raise ConfigError(f"{location} split {split!r}: {error}") from None
    if not fbank:
        raise ConfigError(f"{location} split {split!r} holds no clips")
    return LabelledClips(torch.cat(fbank), torch.cat(labels), keys, loader.classes)


def read_sample_weights(path: str | Path, keys: list[str]) -> torch.Tensor:
    """Per-clip sampling weights: one float per line in the split's clip order, or `sample_key,weight` lines
    (any order, every clip named). Refuses negative, non-finite, missing or all-zero weights."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise ConfigError(f"finetune.sample_weights={path}: cannot read ({error.strerror})") from None
    try:
        if lines and "," in lines[0]:
            by_key = {}
            for line in lines:
                key, value = line.rsplit(",", 1)
                by_key[key.strip()] = float(value)
            missing = [key for key in keys if key not in by_key]
            if missing:
                raise ConfigError(f"finetune.sample_weights={path}: no weight for {len(missing)} clips, e.g. {missing[:3]}")
            values = [by_key[key] for key in keys]
        else:
            values = [float(line) for line in lines]
    except ValueError as error:
        raise ConfigError(f"finetune.sample_weights={path}: not a number ({error})") from None
    if len(values) != len(keys):
        raise ConfigError(f"finetune.sample_weights={path}: {len(values)} weights for {len(keys)} clips")
    weights = torch.tensor(values, dtype=torch.float64)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ConfigError(f"finetune.sample_weights={path}: weights must be finite, >= 0 and not all 0")
    return weights


class EpochPlan:
    """Which clips each (update, rank, micro-step) trains on (module docstring)."""

    def __init__(self, num_clips: int, clips_per_update: int, micro_batch: int, world_size: int, seed: int,
                 weights: torch.Tensor | None = None, clips_per_epoch: int = 0) -> None:
        self.num_clips, self.micro_batch, self.world_size, self.seed = num_clips, micro_batch, world_size, seed
        self.clips_per_update = clips_per_update
        self.weights = weights
        if weights is not None:
            drawable = int((weights > 0).sum())
            self.epoch_clips = clips_per_epoch or drawable
            if self.epoch_clips > drawable:
                raise ConfigError(
                    f"finetune.clips_per_epoch={self.epoch_clips} exceeds the {drawable} clips with a weight > 0 "
                    "(drawn without replacement)"
                )
        else:
            self.epoch_clips = num_clips
        self.updates_per_epoch = self.epoch_clips // clips_per_update
        if self.updates_per_epoch == 0:
            raise ConfigError(
                f"an epoch of {self.epoch_clips} clips holds no whole update of {clips_per_update} clips "
                "(micro_batch_clips x accumulation x ranks)"
            )
        self._cached: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
            if self.weights is None:
                order = torch.randperm(self.num_clips, generator=generator)
            else:
                order = torch.multinomial(self.weights / self.weights.sum(), self.epoch_clips, replacement=False,
                                          generator=generator)
            self._cached = (epoch, order)
        return self._cached[1]

    def epoch_of(self, update: int) -> int:
        return update // self.updates_per_epoch

    def rows(self, update: int, micro_step: int, rank: int) -> torch.Tensor:
        """Clip indices of (update, micro-step, rank)."""
        epoch, within = divmod(update, self.updates_per_epoch)
        start = within * self.clips_per_update + (micro_step * self.world_size + rank) * self.micro_batch
        return self.order(epoch)[start : start + self.micro_batch]

    def total_updates(self, epochs: int, max_updates: int) -> int:
        return min(max_updates, epochs * self.updates_per_epoch) if epochs else max_updates


def label_prior_map(train_frequencies: torch.Tensor, eval_labels: torch.Tensor) -> float:
    """mAP of scoring every eval clip with the train class frequencies (the baseline of jobs.evaluate)."""
    from jobs.train.metrics import mean_average_precision

    scores = np.tile(train_frequencies.numpy(), (eval_labels.shape[0], 1))
    value, _ = mean_average_precision(eval_labels.numpy(), scores)
    return value if math.isfinite(value) else float("nan")
