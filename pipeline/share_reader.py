"""Reading one slot's samples inside a DataLoader worker, shared by the train and eval loaders.

A slot reads its shares of the epoch's shards in tar order (`read_shares`, through the one shard reader
`pipeline.shards.iter_shard_samples`, which reads only the share's samples and refuses unsafe members: a
name with '..', a directory or an absolute path, a link, an oversized member). Before a sample is decoded
(`pipeline.shards.decode_sample`) what the reader refused in it is raised and its key is checked against
`SAMPLE_KEY` (`check_raw_sample`); a bad sample or shard is logged, counted (`Skips`, reported as
`skipped_samples` / `skipped_shards`) and skipped. `decode_group` checks a mixture group against the set's
`Geometry` (from dataset.json) and `collate_groups` forms the training batch contract of DESIGN.md ("Training
batch"), forming the mixtures with the set's `pipeline.mixers` mixer when the set does not store them.
`valid_frames` is each clip's frame count before its zero padding (the samples' json "frames"); a shard
written without it counts its clips as full length (T), and that is logged once per process.

Workers ignore SIGTERM (the rank checkpoints first) and die with their rank (`init_worker`);
`stop_workers` ends a DataLoader iterator's workers without waiting on a busy one. `derive_seed` derives
the shuffle seeds of a plan.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipeline.config import DataConfig, LoaderConfig
from pipeline.mixers import DEFAULT_DOMAIN, mixer
from pipeline.mixers.base import MixSettings, assemble_group
from pipeline.mixing import MIX_PADDINGS
from pipeline.shard_source import ShardSource, open_shard
from pipeline.shards import SAMPLE_KEY, ShardFormatError, decode_sample, iter_shard_samples
from pipeline.shares import Share

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
WORKER_JOIN_S = 10.0


def init_worker(worker_id: int) -> None:
    """Preemption sends SIGTERM to every process; workers leave it to the rank, which checkpoints first. A
    worker dies with its rank (Linux parent-death signal), so a SIGKILLed rank leaves no worker behind."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def stop_workers(iterator: Any) -> None:
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


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Skips:
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


def _read_share(url: str, share: Share, expected: int, skips: Skips) -> Iterator[dict]:
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


def read_shares(urls: Sequence[str], shares: Sequence[Share], counts: Sequence[int], skips: Skips) -> Iterator[dict]:
    for share in shares:
        yield from _read_share(urls[share.shard], share, counts[share.shard], skips)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a decoded sample must look like, from dataset.json."""

    target_length: int
    mel_bins: int
    patch_size: int
    group_size: int
    rows: int
    num_classes: int
    materialized: bool
    mix_padding: str
    domain: str  # data.mixing.domain: its `pipeline.mixers` mixer forms the mixtures a set does not store

    @property
    def time_patches(self) -> int:
        return self.target_length // self.patch_size


def check_raw_sample(sample: dict) -> None:
    """Raise what the shard reader found wrong with the sample's members, or a key our writer does not write
    (`{key}.{member}` with a plain key)."""
    if "__error__" in sample:
        raise sample["__error__"]
    key = sample["__key__"]
    if not SAMPLE_KEY.fullmatch(key):
        raise ShardFormatError(f"sample key {key!r} is not a plain name (letters, digits, '_' and '-' only)")


def decode_group(sample: dict, geometry: Geometry) -> dict:
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


def collate_groups(groups: Sequence[dict], geometry: Geometry) -> dict[str, torch.Tensor]:
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
    settings = MixSettings(geometry.patch_size, geometry.mix_padding)
    for g, group in enumerate(groups):
        rows = slice(g * size, (g + 1) * size)
        meta = group["meta"]
        valid_frames[rows] = torch.tensor(valid_frame_counts(meta, size, geometry.target_length))
        for i in range(size):
            clean[g * size + i, 0].copy_(torch.from_numpy(group["clips"][i]))
            if group["mixtures"]:
                mixed[g * size + i, 0].copy_(torch.from_numpy(group["mixtures"][i]))
        layout = assemble_group(meta["mixtures"], clean[rows, 0], geometry.patch_size, meta.get("frames"))
        partner[rows] = layout.partner + g * size
        nomix[rows] = layout.nomix
        if not group["mixtures"]:
            mixed[rows, 0] = mixer(geometry.domain).mix([layout], settings)[0]
    return {"clean": clean, "mixed": mixed, "partner": partner, "nomix": nomix, "valid_frames": valid_frames}


def unchanged(item: Any) -> Any:
    return item


def data_config(cfg: LoaderConfig | DataConfig) -> tuple[LoaderConfig, str | None]:
    if isinstance(cfg, DataConfig):
        return cfg.loader, cfg.mixing.mix_padding
    if isinstance(cfg, LoaderConfig):
        return cfg, None
    raise TypeError(f"cfg must be a LoaderConfig or DataConfig, got {type(cfg).__name__}")


def dataset_geometry(source: ShardSource, mix_padding: str | None) -> Geometry:
    info = source.info
    padding = mix_padding or info.get("mix_padding", "zero")
    if padding not in MIX_PADDINGS:
        raise ValueError(f"mix_padding must be one of {MIX_PADDINGS}, got {padding!r}")
    return Geometry(
        target_length=info["target_length"],
        mel_bins=info["mel_bins"],
        patch_size=info["patch_size"],
        group_size=int(info.get("group_size", 1)),
        rows=int(info.get("r", 0)),
        num_classes=len(info.get("classes", [])),
        materialized=bool(info.get("materialize_mixtures", False)),
        mix_padding=padding,
        domain=info.get("domain", DEFAULT_DOMAIN),
    )
