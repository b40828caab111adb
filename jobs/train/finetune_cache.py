"""The fine-tuning train split as a disk-backed clip cache (`finetune.cache_dir`), so a split larger than memory
(AS-2M: ~537 GB of float16 fbank) can be trained on with resident memory of about one micro-batch.

One folder per (dataset fingerprint, split, shard names and sample counts, fbank shape, classes, loader
workers), named `{fingerprint[:16]}-{split}-{T}x{F}-{digest}` where the digest covers all of it; a shard set
with another fingerprint, more shards or another front-end shape gets another folder and never reads this one.
The folder holds `fbank.npy` (float16, (capacity, T, F)), `labels.npy` (float32 multi-hot, (capacity, C)),
`keys.json` and, written last, `manifest.json` (the key, the clip count, the classes). Clips are in the loader's
order, so rows, labels and keys are those of the in-memory path. Fewer clips than the index counts (undecodable
samples are skipped) leave unused rows at the end, which readers slice off.

A build writes into `.{name}.building` and publishes by renaming the folder, so a killed build never leaves a
folder that looks complete; the next run removes the leftover and builds again. Writers exclude each other with
an exclusive `fcntl.flock` on `{name}.lock` in the cache folder: the first rank of a node to take it builds, the
node's other ranks block on it and then read the published folder (the kernel drops a dead holder's lock). A
file lock rather than a process-group barrier, since a long build would outlast the collective timeout and the
lock also covers two jobs sharing one node's cache. Readers map the arrays read-only (`np.load(mmap_mode="r")`)
and copy only the rows of each micro-batch. `LabelledClips` is the split either way: tensors in memory or `MappedRows`
over a cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from jobs.train.config import ConfigError
from pipeline.atomic import publish_folder

log = logging.getLogger("sslam.finetune")

MANIFEST = "manifest.json"
FBANK, LABELS, KEYS = "fbank.npy", "labels.npy", "keys.json"
CHUNK_ROWS = 65536  # rows summed at a time for the class frequencies


class MappedRows:
    """Rows of a read-only memory-mapped array; `[rows]` copies just those rows into a torch tensor.

    `channel` inserts the fbank's channel axis, so a (N, T, F) array reads as (N, 1, T, F) like the in-memory
    tensor."""

    def __init__(self, array: np.ndarray, channel: bool = False) -> None:
        self.array, self.channel = array, channel

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.array.shape
        return (shape[0], 1, *shape[1:]) if self.channel else tuple(shape)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, rows) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        order = np.argsort(rows, kind="stable")  # ascending reads: sequential on disk for nearby rows
        picked = np.empty((rows.size, *self.array.shape[1:]), dtype=self.array.dtype)
        picked[order] = self.array[rows[order]]
        tensor = torch.from_numpy(picked)
        return tensor.unsqueeze(1) if self.channel else tensor

    def column_means(self) -> torch.Tensor:
        total = np.zeros(self.array.shape[1:], dtype=np.float64)
        for start in range(0, len(self), CHUNK_ROWS):
            total += self.array[start : start + CHUNK_ROWS].sum(axis=0, dtype=np.float64)
        return torch.from_numpy(total / max(1, len(self))).float()


def cache_key(loader, split: str) -> dict:
    """What decides the cached clips of `split` (module docstring); refuses a shard set without a fingerprint."""
    fingerprint = loader.source.info.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ConfigError(f"{loader.source.root}/dataset.json has no fingerprint: finetune.cache_dir cannot key a "
                          "cache on it; set finetune.cache_dir='' to hold the split in memory")
    geometry = loader.geometry
    shards = loader.source.shard_names(split, 0)
    return {
        "fingerprint": fingerprint,
        "split": split,
        "shards": shards,
        "samples": loader.source.sample_counts(shards),
        "frames": geometry.target_length,
        "mel_bins": geometry.mel_bins,
        "classes": geometry.num_classes,
        "num_workers": loader.workers,  # the loader interleaves its workers' clips: the order depends on it
    }


def folder_name(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{key['fingerprint'][:16]}-{key['split']}")
    return f"{readable}-{key['frames']}x{key['mel_bins']}-{digest}"


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Block until this process holds the flock of `lock_path` (module docstring)."""
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ConfigError(f"finetune.cache_dir: cannot open {lock_path} ({error.strerror})") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as error:
            raise ConfigError(f"finetune.cache_dir: cannot lock {lock_path} ({error.strerror}); use a local disk"
                              ) from None
        yield
    finally:
        os.close(descriptor)


@dataclass
class LabelledClips:
    """fbank[rows] and labels[rows] (rows: a LongTensor) give tensors: both are tensors held in memory, or
    MappedRows over a clip cache."""

    fbank: torch.Tensor | MappedRows  # (N, 1, T, F) raw fbank, float16 as stored
    labels: torch.Tensor | MappedRows  # (N, C) float32 multi-hot
    keys: list[str]  # sample key of each clip
    classes: list[dict]

    def class_frequencies(self) -> torch.Tensor:
        """(C,) float32: the fraction of clips carrying each class."""
        if isinstance(self.labels, MappedRows):
            return self.labels.column_means()
        return self.labels.float().mean(dim=0)


def load_cached(loader, split: str, cache_dir: str):
    """The split as LabelledClips over the cache in `cache_dir`, built from `loader` first if not complete."""
    if "://" in cache_dir and not cache_dir.startswith("file://"):
        raise ConfigError(f"finetune.cache_dir={cache_dir}: must be a local (or mounted) folder, not a URL")
    root = Path(cache_dir.removeprefix("file://"))
    key = cache_key(loader, split)
    name = folder_name(key)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"finetune.cache_dir={cache_dir}: cannot create it ({error.strerror})") from None
    folder = root / name
    with exclusive(root / f"{name}.lock"):
        clips = open_cache(folder, key)
        if clips is None:
            try:
                build(loader, key, folder)
            except OSError as error:
                raise ConfigError(f"finetune.cache_dir={cache_dir}: writing the clip cache {folder} failed "
                                  f"({error.strerror or error})") from None
            clips = open_cache(folder, key)
            if clips is None:
                raise RuntimeError(f"the clip cache {folder} was just built but does not read back")
        else:
            log.info("train split %r: reusing the clip cache %s (%d clips)", split, folder, len(clips.keys))
    return clips


def open_cache(folder: Path, key: dict):
    """LabelledClips over a complete cache folder, or None when it is missing, incomplete or not this key's."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        log.warning("clip cache %s: unreadable manifest (%s); building it again", folder, error)
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key or not isinstance(manifest.get("clips"), int):
        log.warning("clip cache %s: its manifest names other data; building it again", folder)
        return None
    count = manifest["clips"]
    try:
        fbank = np.load(folder / FBANK, mmap_mode="r")
        labels = np.load(folder / LABELS, mmap_mode="r")
        keys = json.loads((folder / KEYS).read_text())
    except (OSError, ValueError) as error:
        log.warning("clip cache %s: unreadable arrays (%s); building it again", folder, error)
        return None
    expected = {"fbank": (key["frames"], key["mel_bins"]), "labels": (key["classes"],)}
    if (fbank.shape[1:], labels.shape[1:]) != (expected["fbank"], expected["labels"]) or min(
            fbank.shape[0], labels.shape[0]) < count or len(keys) != count:
        log.warning("clip cache %s: arrays do not match its manifest; building it again", folder)
        return None
    return LabelledClips(MappedRows(fbank[:count], channel=True), MappedRows(labels[:count]), keys,
                         manifest["classes"])


def build(loader, key: dict, folder: Path) -> None:
    """Read the split once through `loader` into `.{name}.building`, then publish it as `folder`."""
    staging = folder.parent / f".{folder.name}.building"
    for leftover in (staging, folder):  # a killed build, or a folder open_cache refused
        if leftover.exists():
            shutil.rmtree(leftover)
    capacity = sum(key["samples"])
    fbank_shape, labels_shape = (capacity, key["frames"], key["mel_bins"]), (capacity, key["classes"])
    needed = capacity * (key["frames"] * key["mel_bins"] * 2 + key["classes"] * 4)
    free = shutil.disk_usage(folder.parent).free
    if free < needed:
        raise ConfigError(f"finetune.cache_dir={folder.parent}: the clip cache of split {key['split']!r} needs "
                          f"{needed / 2**30:.1f} GiB, the disk has {free / 2**30:.1f} GiB free")
    staging.mkdir()
    keys: list[str] = []
    log.info("train split %r: building the clip cache %s (%d clips)", key["split"], folder, capacity)
    with open(staging / FBANK, "wb") as fbank_file, open(staging / LABELS, "wb") as labels_file:
        # Plain sequential writes under a .npy header: a write-mode memmap would keep every written page mapped.
        for handle, dtype, shape in ((fbank_file, np.float16, fbank_shape), (labels_file, np.float32, labels_shape)):
            np.lib.format.write_array_header_1_0(
                handle, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
        for batch in loader:
            rows = batch["clean"].shape[0]
            if len(keys) + rows > capacity:
                raise ConfigError(f"split {key['split']!r} yields more clips than the {capacity} samples its index "
                                  "counts (a mix split?): finetune.cache_dir holds one clip per sample")
            fbank_file.write(batch["clean"].squeeze(1).half().numpy().tobytes())
            labels_file.write(batch["labels"].float().numpy().tobytes())
            keys += loader.last_keys
        if not keys:
            raise ConfigError(f"split {key['split']!r} holds no clips")
        for handle, shape, itemsize in ((fbank_file, fbank_shape, 2), (labels_file, labels_shape, 4)):
            handle.truncate(handle.tell() + (capacity - len(keys)) * int(np.prod(shape[1:])) * itemsize)
    (staging / KEYS).write_text(json.dumps(keys))
    manifest = {"key": key, "clips": len(keys), "classes": loader.classes, "skipped_samples": loader.skipped_samples}
    (staging / MANIFEST).write_text(json.dumps(manifest))
    publish_folder(staging, folder)
    log.info("clip cache %s: %d clips written (%d samples skipped)", folder, len(keys), loader.skipped_samples)
