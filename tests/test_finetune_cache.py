"""The fine-tuning clip cache (jobs.train.finetune_cache, `finetune.cache_dir`) on tests/test_evaluate.py's labelled
shards: the same clips as the in-memory split, reuse without the shards, a killed build, another fingerprint,
hostile cache folders, memory-mapped rows and one writer at a time."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from jobs.train import finetune_cache
from jobs.train.config import ConfigError, load_config
from jobs.train.finetune_data import load_split
from pipeline.eval_loader import EvalLoader
from test_evaluate import CLIPS, NUM_CLASSES, write_evaluation_set


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(config, a pristine shard folder) made once; tests copy it."""
    config = load_config("tiny_finetune", ["data.loader.shards=shards"])
    folder = tmp_path_factory.mktemp("cache-source") / "shards"
    write_evaluation_set(folder, config.data.audio)
    return config, folder


@pytest.fixture
def shards(source, tmp_path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(source[1], copy)
    return copy


@pytest.fixture
def data(source):
    return source[0].data


def published(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def assert_same_clips(cached, memory) -> None:
    rows = torch.tensor([7, 0, 119, 3, 3, 64])  # unsorted, repeated, both ends
    assert cached.fbank.shape == tuple(memory.fbank.shape)
    assert tuple(cached.labels.shape) == tuple(memory.labels.shape)
    assert torch.equal(cached.fbank[rows], memory.fbank[rows])
    assert cached.fbank[rows].dtype == torch.float16 and cached.fbank[rows].shape[1] == 1
    assert torch.equal(cached.labels[rows], memory.labels[rows])
    assert torch.equal(cached.fbank[torch.arange(len(memory.keys))], memory.fbank)
    assert torch.equal(cached.labels[torch.arange(len(memory.keys))], memory.labels)
    assert cached.keys == memory.keys and cached.classes == memory.classes
    assert torch.allclose(cached.class_frequencies(), memory.class_frequencies(), atol=1e-7)


def test_a_built_then_reused_cache_holds_the_in_memory_clips_memory_mapped(data, shards, tmp_path):
    memory = load_split(data, str(shards), "train")
    cache = tmp_path / "cache"
    built = load_split(data, str(shards), "train", cache_dir=str(cache))
    reused = load_split(data, str(shards), "train", cache_dir=str(cache))
    for cached in (built, reused):
        assert_same_clips(cached, memory)
        # Nothing is materialised: the rows stay a read-only map of the file.
        assert isinstance(cached.fbank.array, np.memmap) and not cached.fbank.array.flags.writeable
        assert isinstance(cached.labels.array, np.memmap)
    assert len(memory.keys) == CLIPS["train"] and memory.labels.shape[1] == NUM_CLASSES
    [folder] = published(cache)
    assert folder.name.startswith("synth-eval-0-train-512x64-")
    assert (folder / "fbank.npy").stat().st_size >= CLIPS["train"] * 512 * 64 * 2


def test_a_complete_cache_loads_without_the_shards(data, shards, tmp_path):
    cache = tmp_path / "cache"
    first = load_split(data, str(shards), "train", cache_dir=str(cache))
    for tar in shards.glob("train-*.tar"):
        tar.rename(tar.with_suffix(".gone"))
    with pytest.raises(ConfigError):
        load_split(data, str(shards), "train")  # the shards are really gone
    again = load_split(data, str(shards), "train", cache_dir=str(cache))
    rows = torch.arange(CLIPS["train"])
    assert torch.equal(again.fbank[rows], first.fbank[rows]) and again.keys == first.keys


def test_a_build_killed_midway_leaves_no_complete_cache_and_the_next_load_rebuilds(data, shards, tmp_path,
                                                                                  monkeypatch):
    cache = tmp_path / "cache"
    collate, calls = EvalLoader._collate, []

    def dies_on_the_third_batch(self, items):
        calls.append(len(items))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return collate(self, items)

    monkeypatch.setattr(EvalLoader, "_collate", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        load_split(data, str(shards), "train", batch_size=16, cache_dir=str(cache))
    monkeypatch.undo()
    assert published(cache) == []  # only the hidden staging folder, which has no manifest
    assert not list(cache.glob("*/manifest.json"))
    rebuilt = load_split(data, str(shards), "train", cache_dir=str(cache))
    assert_same_clips(rebuilt, load_split(data, str(shards), "train"))
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [p.name for p in published(cache)]  # staging gone


def test_another_fingerprint_or_shard_set_gets_another_folder(data, shards, tmp_path):
    cache = tmp_path / "cache"
    first = load_split(data, str(shards), "train", cache_dir=str(cache))
    other = tmp_path / "other"
    write_evaluation_set(other, data.audio, seed=1)  # other clips, fingerprint synth-eval-1
    second = load_split(data, str(other), "train", cache_dir=str(cache))
    assert len(published(cache)) == 2
    assert not torch.equal(second.fbank[torch.arange(8)], first.fbank[torch.arange(8)])
    assert_same_clips(second, load_split(data, str(other), "train"))
    # Same fingerprint, a subset of the shards (a pattern location): a third folder, not the full split's rows.
    subset = load_split(data, f"{shards}/train-e00-00000{{0..1}}.tar", "train", cache_dir=str(cache))
    assert len(published(cache)) == 3 and len(subset.keys) == 64 and subset.keys == first.keys[:64]


@pytest.mark.parametrize("damage", ["manifest of other data", "truncated fbank", "garbled manifest"])
def test_a_damaged_cache_is_rebuilt_not_read(data, shards, tmp_path, damage):
    cache = tmp_path / "cache"
    load_split(data, str(shards), "train", cache_dir=str(cache))
    [folder] = published(cache)
    if damage == "manifest of other data":
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["key"]["fingerprint"] = "someone-else"
        (folder / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "truncated fbank":
        with open(folder / "fbank.npy", "r+b") as handle:
            handle.truncate(4096)
    else:
        (folder / "manifest.json").write_text("{not json")
    rebuilt = load_split(data, str(shards), "train", cache_dir=str(cache))
    assert_same_clips(rebuilt, load_split(data, str(shards), "train"))
    assert json.loads((folder / "manifest.json").read_text())["key"]["fingerprint"] == "synth-eval-0"


def test_a_second_reader_waits_for_the_writer_holding_the_lock(data, shards, tmp_path):
    cache = tmp_path / "cache"
    loader = EvalLoader(dataclasses.replace(data.loader, shards=str(shards)), "train")
    name = finetune_cache.folder_name(finetune_cache.cache_key(loader, "train"))
    cache.mkdir()
    done = threading.Event()
    with finetune_cache.exclusive(cache / f"{name}.lock"):
        waiting = threading.Thread(
            target=lambda: (load_split(data, str(shards), "train", cache_dir=str(cache)), done.set()))
        waiting.start()
        assert not done.wait(1.0)  # blocked on the lock the "writer" holds
        assert published(cache) == []
    waiting.join(60)
    assert done.is_set() and len(published(cache)) == 1


def test_a_shard_set_without_a_fingerprint_or_a_url_cache_is_refused(data, shards, tmp_path):
    info = json.loads((shards / "dataset.json").read_text())
    del info["fingerprint"]
    (shards / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="no fingerprint"):
        load_split(data, str(shards), "train", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="not a URL"):
        load_split(data, str(shards), "train", cache_dir="s3://bucket/cache")


def test_a_disk_without_room_for_the_split_is_refused_before_writing(data, shards, tmp_path, monkeypatch):
    needed = CLIPS["train"] * (512 * 64 * 2 + NUM_CLASSES * 4)
    monkeypatch.setattr(finetune_cache.shutil, "disk_usage", lambda path: SimpleNamespace(free=needed - 1))
    with pytest.raises(ConfigError, match=r"needs 0\.0 GiB, the disk has 0\.0 GiB free"):
        load_split(data, str(shards), "train", cache_dir=str(tmp_path / "cache"))
    assert published(tmp_path / "cache") == [] and not list((tmp_path / "cache").glob(".*building"))
