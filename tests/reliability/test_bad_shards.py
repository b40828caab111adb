"""Damaged and hostile shard tars through the training loader (pipeline.loader.TrainLoader) and `sslam inspect`.

Each kind of damage is applied to one sample of an otherwise valid shard (tests/shardsets.py writes the set):
a tar cut inside a member, a member larger than shards.DEFAULT_MAX_MEMBER_BYTES, clip arrays stored as float32
or int16, a mixture of the wrong shape, a json member that is not JSON; and, written by hand with `tarfile`,
member names with `..` or an absolute path. The loader must skip and count every bad sample (skipped_samples,
skipped_shards) and serve every good one; `sslam inspect` must not crash (or must fail with a message naming
the shard). Single-member damage at the shard level is in tests/test_shards.py and tests/test_loader.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jobs.cli import main as sslam
from pipeline import shards
from pipeline.config import LoaderConfig
from pipeline.loader import TrainLoader
from pipeline.plan import sample_key, shard_name
from shardsets import write_training_set

T, F, G, PER_SHARD = 64, 16, 3, 4
CONTENT_DAMAGE = ["truncated_tar", "oversized_member", "float32_array", "int16_array", "wrong_shape", "bad_json"]
NAME_DAMAGE = {"dotdot_name": "../escape", "absolute_name": "/abs/escape"}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def damaged_shard(kind: str, samples: list[tuple[str, dict[str, bytes]]], position: int) -> bytes:
    """The tar bytes of `samples` with sample `position` damaged as `kind`."""
    samples = [(key, dict(members)) for key, members in samples]
    key, members = samples[position]
    if kind in NAME_DAMAGE:
        renamed = [(NAME_DAMAGE[kind] if i == position else k, m) for i, (k, m) in enumerate(samples)]
        return _tar([(f"{k}.{name}", m[name]) for k, m in renamed for name in sorted(m)])
    if kind == "truncated_tar":
        data = shards.shard_bytes(samples)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            member = archive.getmember(f"{key}.c0.npy")
        return data[: member.offset_data + member.size // 2]
    if kind == "oversized_member":
        rows = shards.DEFAULT_MAX_MEMBER_BYTES // (2 * F) + T
        members[f"c{G - 1}.npy"] = _npy(np.zeros((rows, F), dtype=np.float16))
    elif kind == "float32_array":
        members["c0.npy"] = _npy(np.zeros((T, F), dtype=np.float32))
    elif kind == "int16_array":
        members["c1.npy"] = _npy(np.zeros((T, F), dtype=np.int16))
    elif kind == "wrong_shape":
        members["m0.npy"] = _npy(np.zeros((T, F + 1), dtype=np.float16))
    elif kind == "bad_json":
        members["json"] = b'{"clips": ["a", "b", '
    else:
        raise AssertionError(kind)
    return shards.shard_bytes(samples)


def _loader_run(directory: Path, caplog) -> SimpleNamespace:
    caplog.clear()
    loader = TrainLoader(LoaderConfig(shards=str(directory), micro_batch_clips=G, num_workers=0, shuffle_buffer=2),
                         "train", rank=0, world_size=1, epoch=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.share_reader"):
        served = [key for _ in loader for key in loader.last_keys]
    return SimpleNamespace(loader=loader, served=served, log=" ".join(r.getMessage() for r in caplog.records))


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory) -> Path:
    """Shard 0 stays valid; shard 1 + k receives damage kind k (CONTENT_DAMAGE, then NAME_DAMAGE)."""
    directory = tmp_path_factory.mktemp("clean_set")
    info = write_training_set(directory, T, F, group_size=G,
                              num_shards=1 + len(CONTENT_DAMAGE) + len(NAME_DAMAGE), groups_per_shard=PER_SHARD)
    # The preprocessing job also records the sample rate, which `sslam inspect` prints.
    (directory / "dataset.json").write_text(json.dumps({**info, "sample_rate": 16000}))
    return directory


def _damaged_copy(clean_set: Path, target: Path, kinds: list[str], position: int) -> dict[str, str]:
    """Copy the set with the shard of each kind damaged at `position`; {kind: damaged shard name}, keeping only
    shard 0 and the damaged shards in dataset.json."""
    target.mkdir()
    info = json.loads((clean_set / "dataset.json").read_text())
    every = list(CONTENT_DAMAGE) + list(NAME_DAMAGE)
    damaged = {kind: shard_name("train", 0, 1 + every.index(kind)) for kind in kinds}
    for name in [shard_name("train", 0, 0), *damaged.values()]:
        os.symlink(clean_set / name, target / name)
    shutil.copy(clean_set / "index.parquet", target / "index.parquet")
    for kind, name in damaged.items():
        (target / name).unlink()
        (target / name).write_bytes(damaged_shard(kind, shards.read_shard_samples(clean_set / name), position))
    info["splits"]["train"]["shards_per_epoch"] = {"0": [shard_name("train", 0, 0), *damaged.values()]}
    (target / "dataset.json").write_text(json.dumps(info))
    return damaged


@pytest.fixture(scope="module")
def content_damage(clean_set, tmp_path_factory) -> SimpleNamespace:
    directory = tmp_path_factory.mktemp("content") / "set"
    damaged = _damaged_copy(clean_set, directory, CONTENT_DAMAGE, position=1)
    return SimpleNamespace(directory=directory, damaged=damaged)


def test_the_loader_serves_every_good_sample_and_counts_the_damaged(content_damage, caplog):
    """Tried: one shard per content damage (sample 1 of 4 damaged; the cut tar also loses samples 2 and 3).
    Survives: every other sample is served exactly once; skipped_samples counts the 5 damaged samples + the
    3 the cut took; skipped_shards counts the cut shard; served + skipped + dropped = the epoch."""
    run = _loader_run(content_damage.directory, caplog)
    lost = {sample_key("train", 0, int(name[-10:-4]), i)
            for kind, name in content_damage.damaged.items()
            for i in (range(1, PER_SHARD) if kind == "truncated_tar" else [1])}
    everything = {sample_key("train", 0, s, i) for s in [0, *(int(n[-10:-4]) for n in content_damage.damaged.values())]
                  for i in range(PER_SHARD)}
    assert sorted(run.served) == sorted(everything - lost)
    assert run.loader.skipped_samples == len(lost) == 8
    assert run.loader.skipped_shards == 1
    assert len(run.served) + run.loader.skipped_samples + run.loader.dropped_samples == len(everything)


@pytest.mark.parametrize("kind", CONTENT_DAMAGE)
def test_the_loader_log_names_each_damaged_sample_or_shard(content_damage, caplog, kind):
    """Tried: each content damage. Survives: a warning names the damaged sample (the cut shard: the shard),
    so an operator can find it."""
    run = _loader_run(content_damage.directory, caplog)
    name = content_damage.damaged[kind]
    expected = name if kind == "truncated_tar" else sample_key("train", 0, int(name[-10:-4]), 1)
    assert expected in run.log


def test_the_loader_skips_members_with_unsafe_names(clean_set, tmp_path, caplog):
    """Tried: a hand-written tar whose sample 1 is named `../escape.*` and another whose sample 1 is named
    `/abs/escape.*` (valid content otherwise). Survives: both skipped and counted, every other sample served."""
    damaged = _damaged_copy(clean_set, tmp_path / "set", list(NAME_DAMAGE), position=1)
    run = _loader_run(tmp_path / "set", caplog)
    good = {sample_key("train", 0, s, i) for s in [0, *(int(n[-10:-4]) for n in damaged.values())]
            for i in range(PER_SHARD)} - {sample_key("train", 0, int(n[-10:-4]), 1) for n in damaged.values()}
    assert sorted(run.served) == sorted(good)
    assert run.loader.skipped_samples == len(NAME_DAMAGE)


def test_inspect_summary_survives_damaged_and_missing_shards(content_damage, tmp_path, capsys):
    """Tried: `sslam inspect` (text summary) on the damaged set with one listed shard deleted. Survives:
    the whole summary is printed, it reports the missing shard by name, and the exit is 1 naming it on stderr
    (a script can gate on it)."""
    directory = tmp_path / "set"
    shutil.copytree(content_damage.directory, directory, symlinks=True)
    missing = content_damage.damaged["bad_json"]
    (directory / missing).unlink()
    assert sslam(["inspect", str(directory)]) == 1
    captured = capsys.readouterr()
    assert "1 missing" in captured.out and missing in captured.out and "\nsplit train" in captured.out
    assert f"1 listed shards missing: {missing}" in captured.err


def _inspect_png(directory: Path, png: Path, capsys) -> tuple[int, str]:
    code = sslam(["inspect", str(directory), "--png", str(png)])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("kind", CONTENT_DAMAGE + list(NAME_DAMAGE))
def test_inspect_preview_of_a_damaged_first_shard_does_not_crash(clean_set, tmp_path, capsys, kind):
    """Tried: `sslam inspect SET --png P` where the first sample of the first listed shard has the damage.
    Survives: either a preview of the good samples (exit 0) or a non-zero exit whose message names the shard;
    never an exception."""
    damaged = _damaged_copy(clean_set, tmp_path / "set", [kind], position=0)
    info = json.loads((tmp_path / "set" / "dataset.json").read_text())
    info["splits"]["train"]["shards_per_epoch"]["0"] = [damaged[kind], shard_name("train", 0, 0)]
    (tmp_path / "set" / "dataset.json").write_text(json.dumps(info))
    code, err = _inspect_png(tmp_path / "set", tmp_path / "preview.png", capsys)
    if code == 0:
        assert (tmp_path / "preview.png").stat().st_size > 0
    else:
        assert damaged[kind] in err


def test_training_refuses_a_dataset_json_that_is_not_json(clean_set, tmp_path):
    """Tried: a shard folder whose dataset.json is cut mid-document. Survives: the loader raises a ValueError
    naming the file (no batch is formed from a set it cannot describe)."""
    directory = tmp_path / "set"
    shutil.copytree(clean_set, directory)
    (directory / "dataset.json").write_text('{"splits": {"train": ')
    with pytest.raises(ValueError, match="dataset.json is not UTF-8 JSON"):
        TrainLoader(LoaderConfig(shards=str(directory), micro_batch_clips=G, num_workers=0), "train", 0, 1, 0)


def test_inspect_of_a_dataset_json_that_is_not_json_fails_cleanly(clean_set, tmp_path, capsys):
    """Tried: `sslam inspect` on a folder whose dataset.json is cut mid-document. Survives: a non-zero exit
    with a message naming dataset.json, no exception."""
    directory = tmp_path / "set"
    shutil.copytree(clean_set, directory)
    (directory / "dataset.json").write_text('{"splits": {"train": ')
    code = sslam(["inspect", str(directory)])
    assert code != 0 and "dataset.json" in capsys.readouterr().err
