"""The Ray preprocessing job (pipeline.preprocess, jobs.preprocess, pipeline.inspect) on a local 2-CPU Ray.

One logmel_max run over a generated sample dataset (with broken files) is shared by most tests; the
waveform_sum and unmaterialised variants run once each. Multi-process scenarios (several nodes, a real
`ray job submit`, SIGKILLed driver and worker) are in test_preprocess_cluster.py.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import shutil
import socket
import threading
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import soundfile
import torch
import yaml

from jobs.cli import main as sslam
from jobs.train.config import load_config
from jobs.preprocess import main, run_preprocess
from pipeline import audio, shards, storage
from pipeline.config import AudioConfig, LoaderConfig, MixingConfig, SynthConfig
from pipeline.inspect import listed_shards, render_groups, summarize
from pipeline.eval_loader import EvalLoader
from pipeline.loader import TrainLoader
from pipeline.shard_source import MixedShardSetError, ShardSource
from pipeline.locking import LOCK_NAME, OutputLock, OutputLockedError
from pipeline.mixing import nomix_rows
from pipeline.plan import shard_name
from pipeline.ledger import check_ledger
from pipeline.preprocess_errors import LedgerError
from pipeline.shard_task import ShardJob, process_shard
from pipeline.shardset import changed_sources, finished_record, source_state
from pipeline.synth import make_sample_dataset

T, F, PATCH, G, EPOCHS = 128, 32, 16, 3, 2
TP = T // PATCH
R = nomix_rows(TP)
BROKEN_REASONS = {
    "empty": ("decode", "empty_file"),
    "truncated_wav": ("decode", "corrupt"),
    "truncated_flac": ("decode", "corrupt"),
    "nan": ("decode", "non_finite"),
    "too_short": ("decode", "too_short"),
    "missing": ("manifest", "missing_file"),
}


def write_config(path: Path, sample: Path, output: str, **data_overrides) -> Path:
    """A job YAML over the generated sample dataset at `sample`, writing to `output`."""
    data = {
        "audio": {"target_length": T, "mel_bins": F},
        "source": {
            "kind": "audioset",
            "audio_root": str(sample / "audio"),
            "class_labels_csv": str(sample / "class_labels_indices.csv"),
            "splits": [
                {"name": "train", "csv": str(sample / "balanced_train_segments.csv"), "mix": True},
                {"name": "eval", "csv": str(sample / "eval_segments.csv"), "mix": False},
            ],
        },
        "mixing": {"group_size": G, "mixture_epochs": EPOCHS},
        "shards": {"output": output, "groups_per_shard": 3, "clips_per_eval_shard": 4, "seed": 5},
        "loader": {"micro_batch_clips": 6},
    }
    for section, values in data_overrides.items():
        data[section].update(values)
    document = {
        "name": "preprocess-test",
        "data": data,
        "model": {"target_length": T, "mel_bins": F, "patch_size": PATCH},
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("sample")
    summary = make_sample_dataset(root, SynthConfig(train_clips=30, eval_clips=9, seed=0))
    return SimpleNamespace(root=root, broken=summary["broken"])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _run(tmp: Path, sample: SimpleNamespace, name: str, **data_overrides) -> SimpleNamespace:
    output = tmp / name
    config = load_config(str(write_config(tmp / f"{name}.yaml", sample.root, str(output), **data_overrides)))
    summary = run_preprocess(config, progress=False)
    return SimpleNamespace(config=config, output=output, summary=summary)


@pytest.fixture(scope="module")
def logmel(tmp_path_factory, sample, local_ray) -> SimpleNamespace:
    return _run(tmp_path_factory.mktemp("logmel"), sample, "shards")


def _samples(output: Path) -> list[tuple[str, str, dict]]:
    """(shard name, sample key, decoded sample) of every shard, in name order."""
    found = []
    for path in sorted(glob.glob(str(output / "*.tar"))):
        for key, members in shards.read_shard_samples(path):
            found.append((os.path.basename(path), key, shards.decode_sample(members, expected_shape=(T, F))))
    return found


def _manifest_paths(output: Path) -> dict[str, str]:
    rows = pq.read_table(output / "manifest.parquet").to_pylist()
    return {row["key"]: row["path"] for row in rows}


def test_shard_members_are_the_fbank_of_their_clips(logmel):
    paths = _manifest_paths(logmel.output)
    cfg = logmel.config.data.audio
    cache: dict[str, np.ndarray] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tasks run torch single-threaded; so must the reference, for bit equality
    try:
        checked = 0
        for _, _, sample in _samples(logmel.output):
            for key, clip in zip(sample["meta"]["clips"], sample["clips"]):
                if key not in cache:
                    wave = audio.load_waveform(paths[key], cfg)
                    cache[key] = audio.fbank_batch([wave], cfg)[0].numpy().astype(np.float16)
                np.testing.assert_array_equal(clip, cache[key], err_msg=key)
                checked += 1
    finally:
        torch.set_num_threads(threads)
    assert checked == logmel.summary["primaries"] + logmel.summary["fillers"]


def test_every_sample_records_each_clips_valid_frames_before_its_zero_padding(logmel):
    """The json's "frames" (the loader's `valid_frames`, model.padding: aware) of train groups and eval clips."""
    paths = _manifest_paths(logmel.output)
    cfg = logmel.config.data.audio
    short = 0
    for _, _, sample in _samples(logmel.output):
        for key, clip, valid in zip(sample["meta"]["clips"], sample["clips"], sample["meta"]["frames"]):
            assert valid == min(audio.frame_count(audio.load_waveform(paths[key], cfg).numel(), cfg), T), key
            assert not clip[valid:].any() and clip[valid - 1].any(), key
            short += valid < T
    assert short > 0  # the sample dataset has clips shorter than the input


def test_mixtures_are_the_logmel_max_with_the_partner_blanked_in_the_windows(logmel):
    groups = [s for _, _, s in _samples(logmel.output) if "mixtures" in s["meta"]]
    assert groups
    for sample in groups:
        clips, mixtures, meta = sample["clips"], sample["mixtures"], sample["meta"]
        assert len(mixtures) == G
        for i in range(G):
            spec = meta["mixtures"][i]
            assert spec["primary"] == i and spec["partner"] == (i - 1) % G and spec["domain"] == "logmel_max"
            partner = clips[(i - 1) % G].astype(np.float32).copy()
            for start, end in spec["nomix"]:
                partner[start * PATCH : end * PATCH] = -np.inf
            expected = np.maximum(clips[i].astype(np.float32), partner).astype(np.float16)
            np.testing.assert_array_equal(mixtures[i], expected)
            blanked = np.zeros(T, dtype=bool)
            for start, end in spec["nomix"]:
                blanked[start * PATCH : end * PATCH] = True
            np.testing.assert_array_equal(mixtures[i][blanked], clips[i][blanked])


def test_windows_follow_the_design_rule_and_the_plan(logmel):
    plan = pq.read_table(logmel.output / "plan.parquet").to_pylist()
    planned = {}
    for row in plan:
        if row["i1"] >= 0:
            key = f"{row['split']}-e{row['epoch']:02d}-{row['shard']:06d}-{row['sample']:06d}"
            planned[(key, row["slot"])] = (row["i1"], row["i2"])
    info = json.loads((logmel.output / "dataset.json").read_text())
    assert info["r"] == R == 1 and info["time_patches"] == TP
    windows = []
    for _, key, sample in _samples(logmel.output):
        for slot, spec in enumerate(sample["meta"].get("mixtures", [])):
            (a, b), (c, d) = spec["nomix"]
            assert b - a == R and d - c == R
            assert 0 <= a <= TP // 2 - 1, spec
            assert a + R <= c <= TP - R - 1, spec
            assert planned[(key, slot)] == (a, c)
            windows.append((a, c))
    # Drawn per mixture: not one pair for all.
    assert len(set(windows)) > 3


def test_every_valid_clip_is_a_primary_once_per_mixture_epoch(logmel, sample):
    index = pq.read_table(logmel.output / "index.parquet").to_pylist()
    manifest = pq.read_table(logmel.output / "manifest.parquet").to_pylist()
    broken = set(sample.broken.values())
    train = {row["key"] for row in manifest if row["split"] == "train"}
    valid = train - broken
    assert len(valid) == 30
    by_shard_keys: dict[str, set] = {}
    for row in index:
        by_shard_keys.setdefault(row["shard"], set()).update(row["clips"])
    for epoch in range(EPOCHS):
        rows = [row for row in index if row["split"] == "train" and row["epoch"] == epoch]
        primaries = Counter(k for row in rows for k, f in zip(row["clips"], row["filler"]) if not f)
        fillers = [k for row in rows for k, f in zip(row["clips"], row["filler"]) if f]
        assert set(primaries) == valid and set(primaries.values()) == {1}
        assert fillers and set(fillers) <= valid
    # The json agrees with the index, and a filler standing in for a failed clip comes from the same shard.
    index_by_key = {row["key"]: row for row in index}
    plan = pq.read_table(logmel.output / "plan.parquet").to_pylist()
    planned_keys = {}
    for row in plan:
        key = f"{row['split']}-e{row['epoch']:02d}-{row['shard']:06d}-{row['sample']:06d}"
        planned_keys.setdefault(key, {})[row["slot"]] = row["key"]
    substituted = 0
    for shard, key, decoded in _samples(logmel.output):
        meta = decoded["meta"]
        assert meta["clips"] == index_by_key[key]["clips"]
        assert meta.get("filler", [False]) == index_by_key[key]["filler"]
        for slot, clip_key in enumerate(meta["clips"]):
            if planned_keys[key][slot] in broken:
                assert meta["filler"][slot] and clip_key != planned_keys[key][slot]
                assert clip_key in by_shard_keys[shard] - broken
                substituted += 1
    assert substituted > 0


def test_broken_files_are_quarantined_with_their_reasons(logmel, sample):
    rows = pq.read_table(logmel.output / "quarantine.parquet").to_pylist()
    for kind, ytid in sample.broken.items():
        stage, reason = BROKEN_REASONS[kind]
        mine = [row for row in rows if row["key"] == ytid]
        assert {(row["stage"], row["reason"]) for row in mine} == {(stage, reason)}, (kind, mine)
        if stage == "decode":
            assert sorted(row["epoch"] for row in mine) == list(range(EPOCHS))
            assert all(row["shard"].startswith("train-") and row["detail"] for row in mine)
        else:
            assert len(mine) == 1 and mine[0]["epoch"] is None
    assert logmel.summary["quarantined"]["decode"] == {"corrupt": 2, "empty_file": 1, "non_finite": 1, "too_short": 1}


def test_ledger_dataset_json_and_checksums(logmel):
    ledger = logmel.summary["ledger"]
    assert set(ledger) == {"train", "eval"}
    for epoch in map(str, range(EPOCHS)):
        assert ledger["train"][epoch] == {"manifest": 35, "primaries": 30, "fillers": 6, "quarantined": 5}
    assert ledger["eval"] == {"0": {"manifest": 9, "primaries": 9, "fillers": 0, "quarantined": 0}}

    info = json.loads((logmel.output / "dataset.json").read_text())
    for key in ("splits", "group_size", "r", "mixture_epochs", "target_length", "mel_bins", "patch_size", "classes",
                "materialize_mixtures", "fingerprint"):
        assert key in info, key
    assert (info["target_length"], info["mel_bins"], info["patch_size"], info["group_size"]) == (T, F, PATCH, G)
    assert info["fingerprint"] == logmel.summary["fingerprint"] and info["materialize_mixtures"] is True
    assert info["classes"][0] == {"index": 0, "mid": "/m/syn0001", "name": "Pure tone"}
    train, evaluation = info["splits"]["train"], info["splits"]["eval"]
    assert train["mix"] is True and evaluation["mix"] is False
    assert sorted(train["shards_per_epoch"]) == ["0", "1"] and list(evaluation["shards_per_epoch"]) == ["0"]
    assert train["samples"] == 12 and evaluation["samples"] == 9
    names = sorted(listed_shards(info))
    assert names == sorted(os.path.basename(p) for p in glob.glob(str(logmel.output / "*.tar")))
    for name in names:
        assert info["checksums"][name] == hashlib.sha256((logmel.output / name).read_bytes()).hexdigest()
    assert info["feature_stats"]["values"] == 30 * T * F

    # The ledger check names what is missing in a doctored index.
    index = storage.locate(str(logmel.output)).read_table("index.parquet")
    quarantine = storage.locate(str(logmel.output)).read_table("quarantine.parquet")
    manifest = pq.read_table(logmel.output / "manifest.parquet")
    dropped = index.slice(1)
    lost = [k for k, f in zip(index.column("clips")[0].as_py(), index.column("filler")[0].as_py()) if not f]
    with pytest.raises(LedgerError, match=lost[0]):
        check_ledger(manifest, dropped, quarantine, EPOCHS)


def _stamps(output: Path) -> dict[str, int]:
    """mtime of every file of a shard set (records included), but the lock, which records each run's holder."""
    paths = glob.glob(str(output / "*")) + glob.glob(str(output / "_records" / "*"))
    return {p: os.stat(p).st_mtime_ns for p in paths if os.path.basename(p) != LOCK_NAME}


def test_rerun_of_a_finished_job_does_nothing(logmel):
    stamps = _stamps(logmel.output)
    summary = run_preprocess(logmel.config, progress=False)
    assert summary["nothing_to_do"] is True
    assert summary["shards"]["written"] == 0
    assert _stamps(logmel.output) == stamps


def test_a_damaged_shard_is_rewritten_identically(logmel):
    victim = logmel.output / "train-e01-000002.tar"
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 2])
    summary = run_preprocess(logmel.config, progress=False)
    assert summary["shards"]["written"] == 1 and summary["nothing_to_do"] is False
    assert victim.read_bytes() == original


def test_same_size_damage_is_found_only_when_resume_rehashes(logmel):
    victim = logmel.output / "train-e00-000001.tar"
    original = victim.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    victim.write_bytes(bytes(damaged))
    trusting = run_preprocess(logmel.config, progress=False)  # size matches the record: not read again
    assert trusting["shards"]["written"] == 0 and victim.read_bytes() == bytes(damaged)
    rehashing = copy.deepcopy(logmel.config)
    rehashing.data.shards.verify_checksums_on_resume = True
    summary = run_preprocess(rehashing, progress=False)
    assert summary["shards"]["written"] == 1
    assert victim.read_bytes() == original


def test_inspect_summary_and_rendering(logmel, tmp_path, capsys):
    text = summarize(str(logmel.output))
    assert "groups of 3" in text and "0 missing" in text
    assert sslam(["inspect", str(logmel.output)]) == 0
    assert capsys.readouterr().err == ""
    assert "e01: 30 primaries + 5 quarantined = 35 manifest clips" in text
    assert "too_short" in text and "missing_file" in text
    png = render_groups(str(logmel.output), tmp_path / "groups.png", n_groups=2)
    data = Path(png).read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_waveform_sum_mixtures_equal_the_primary_inside_the_windows(tmp_path, sample, local_ray):
    run = _run(tmp_path, sample, "wsum", mixing={"domain": "waveform_sum", "mixture_epochs": 1, "waveform_gain": 0.7})
    groups = [s for _, _, s in _samples(run.output) if "mixtures" in s["meta"]]
    assert groups
    differs = 0
    for decoded in groups:
        for i, spec in enumerate(decoded["meta"]["mixtures"]):
            assert spec["domain"] == "waveform_sum"
            clip = decoded["clips"][i].astype(np.float32)
            mixture = decoded["mixtures"][i].astype(np.float32)
            inside = np.zeros(T, dtype=bool)
            for start, end in spec["nomix"]:
                inside[start * PATCH : end * PATCH] = True
            # Within 1e-3 in float32; each stored value adds at most half a float16 ulp of rounding.
            tolerance = 1e-3 + 2.0**-10 * np.abs(clip[inside])
            assert np.all(np.abs(mixture[inside] - clip[inside]) <= tolerance)
            differs += int(np.abs(mixture[~inside] - clip[~inside]).max() > 0.5)
    assert differs > len(groups)  # outside the windows the partner is really there


def test_unmaterialised_mixtures_write_clips_only(tmp_path, sample, local_ray):
    run = _run(tmp_path, sample, "clips-only", mixing={"materialize_mixtures": False, "mixture_epochs": 1})
    info = json.loads((run.output / "dataset.json").read_text())
    assert info["materialize_mixtures"] is False and info["mixture_epochs"] == 1
    decoded = _samples(run.output)
    assert decoded and all(not sample["mixtures"] for _, _, sample in decoded)
    assert run.summary["ledger"]["train"]["0"]["primaries"] == 30


def _unit_job(tmp_path: Path, sample: SimpleNamespace, output: str) -> tuple[ShardJob, list[str], list[str]]:
    """A hand-made 3-group shard: a group of failed primaries, a group with one failed slot, a clean group."""
    manifest = pq.read_table(write_manifest_for(tmp_path, sample))
    paths = {row["key"]: row["path"] for row in manifest.to_pylist()}
    good = sorted(set(paths) - set(sample.broken.values()))[:4]
    bad = [sample.broken["empty"], sample.broken["nan"]]

    def row(sample_index, slot, key, filler=False):
        return {"sample": sample_index, "slot": slot, "key": key, "filler": filler, "i1": 0, "i2": 2,
                "path": paths[key], "label_indices": [1]}

    rows = [
        row(0, 0, bad[0]), row(0, 1, bad[1]), row(0, 2, good[0], filler=True),  # no valid primary: dropped
        row(1, 0, good[1]), row(1, 1, bad[0]), row(1, 2, good[2]),  # bad[0] replaced by a filler
        row(2, 0, good[3]), row(2, 1, good[1], filler=True), row(2, 2, good[2]),
    ]
    job = ShardJob(
        name="train-e00-000000.tar", mix=True, rows=rows, output=output,
        audio=AudioConfig(target_length=T, mel_bins=F), mixing=MixingConfig(group_size=G), patch_size=PATCH,
        nomix_rows=R, seed=0, fingerprint="test",
    )
    return job, good, bad


def test_a_group_without_valid_primaries_is_dropped_and_failed_slots_get_fillers(tmp_path, sample):
    job, good, bad = _unit_job(tmp_path, sample, str(tmp_path / "out"))
    record = process_shard(job)
    assert [row["key"] for row in record["index"]] == ["train-e00-000000-000001", "train-e00-000000-000002"]
    first = record["index"][0]
    assert first["filler"] == [False, True, False]
    assert first["clips"][1] in set(good) - {good[1], good[2]}
    assert sorted((row["key"], row["reason"]) for row in record["quarantine"]) == sorted(
        [(bad[0], "empty_file"), (bad[1], "non_finite")]
    )
    assert record["stats"]["groups_dropped"] == 1 and record["stats"]["fillers_substituted"] == 1
    assert storage.locate(str(tmp_path / "out")).is_published(job.name, record["sha256"])
    assert finished_record(storage.locate(str(tmp_path / "out")), job.name, "test") == record


def test_records_on_an_object_store_url_need_the_done_marker(tmp_path, sample):
    output = f"memory://preprocess-test-{uuid.uuid4().hex}"
    job, _, _ = _unit_job(tmp_path, sample, output)
    record = process_shard(job)
    location = storage.locate(output)
    assert location.filesystem is not None
    assert finished_record(location, job.name, "test") == record
    assert finished_record(location, job.name, "another fingerprint") is None
    location.filesystem.delete_file(location.join(job.name + storage.DONE_SUFFIX))
    assert finished_record(location, job.name, "test") is None


def write_manifest_for(tmp_path: Path, sample: SimpleNamespace) -> Path:
    from pipeline.manifest import build_manifest, write_manifest

    config = load_config(str(write_config(tmp_path / "m.yaml", sample.root, str(tmp_path / "unused"))))
    manifest, _ = build_manifest(config.data.source)
    write_manifest(manifest, tmp_path / "manifest.parquet")
    return tmp_path / "manifest.parquet"


def test_config_errors_exit_2_before_starting_ray(tmp_path, sample, capsys):
    config = write_config(tmp_path / "c.yaml", sample.root, str(tmp_path / "out"))
    code = main(["--config", str(config), "--set", "data.mixing.domain=waveform_sum",
                 "--set", "data.mixing.materialize_mixtures=false"])
    assert code == 2
    assert "materialize_mixtures" in capsys.readouterr().err
    assert main(["--config", str(config), "--set", "data.mixing.nomix_rows=3"]) == 2
    assert "nomix_rows" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# One run per output, one plan per output, changed inputs redone


def _tar_bytes(output: Path) -> dict[str, bytes]:
    return {os.path.basename(p): Path(p).read_bytes() for p in sorted(glob.glob(str(output / "*.tar")))}


def _job_yaml(logmel: SimpleNamespace) -> str:
    return str(logmel.output.parent / "shards.yaml")  # what the logmel fixture ran


@pytest.fixture(scope="module")
def reseeded(tmp_path_factory, sample, local_ray) -> SimpleNamespace:
    """One uninterrupted run of the logmel job with another seed (data.shards.seed 6 instead of 5)."""
    return _run(tmp_path_factory.mktemp("reseeded"), sample, "shards", shards={"seed": 6})


def test_index_rows_records_and_fingerprint_json_carry_the_fingerprint(logmel):
    fingerprint = logmel.summary["fingerprint"]
    assert set(pq.read_table(logmel.output / "index.parquet").column("fingerprint").to_pylist()) == {fingerprint}
    held = json.loads((logmel.output / "fingerprint.json").read_text())
    assert held["fingerprint"] == fingerprint
    inputs = held["inputs"]
    assert (inputs["data.shards.seed"], inputs["manifest.clips.train"], inputs["model.patch_size"]) == (5, 35, PATCH)
    assert json.loads((logmel.output / "dataset.json").read_text())["fingerprint_inputs"] == inputs
    info = json.loads((logmel.output / "dataset.json").read_text())
    plan = pq.read_table(logmel.output / "plan.parquet").to_pylist()
    for name in listed_shards(info):
        record = json.loads((logmel.output / "_records" / f"{name}.json").read_text())
        assert record["fingerprint"] == fingerprint
        rows = [row for row in plan if shard_name(row["split"], row["epoch"], row["shard"]) == name]
        paths = {row["key"]: row["path"] for row in rows}
        assert record["sources"] == {key: source_state(path, False) for key, path in paths.items()}
    assert "agree with dataset.json" in summarize(str(logmel.output))


def test_a_run_of_another_plan_into_a_finished_output_exits_2_naming_what_differs(logmel, capsys):
    """Tried: the logmel job again with another seed into its finished output. Survives: exit 2 before any
    shard is written, naming the seed (and the plan digest it changes); every file is untouched."""
    stamps = _stamps(logmel.output)
    assert main(["--config", _job_yaml(logmel), "--set", "data.shards.seed=6", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "data.shards.seed: 5 in the output != 6 now" in error and "plan.sha256" in error
    assert "--overwrite" in error and "manifest.sha256" not in error
    assert _stamps(logmel.output) == stamps


def test_overwrite_replaces_another_plans_set_with_the_bytes_of_a_single_run(tmp_path, sample, logmel, reseeded):
    output = tmp_path / "shards"
    shutil.copytree(logmel.output, output)
    (output / "operator-notes.txt").write_text("not part of the set")
    stray = "train-e07-000000.tar"  # a shard of the old set that the new plan does not have
    shutil.copy(output / "train-e00-000000.tar", output / stray)
    shutil.copy(output / "_records" / "train-e00-000000.tar.json", output / "_records" / f"{stray}.json")
    config = write_config(tmp_path / "job.yaml", sample.root, str(output), shards={"seed": 6})
    assert main(["--config", str(config), "--no-progress", "--overwrite"]) == 0
    assert _tar_bytes(output) == _tar_bytes(reseeded.output)
    assert pq.read_table(output / "index.parquet").equals(pq.read_table(reseeded.output / "index.parquet"))
    info = json.loads((output / "dataset.json").read_text())
    assert info["checksums"] == json.loads((reseeded.output / "dataset.json").read_text())["checksums"]
    assert not (output / stray).exists() and not (output / "_records" / f"{stray}.json").exists()
    assert (output / "operator-notes.txt").read_text() == "not part of the set"
    assert sorted(p.name for p in (output / "_records").iterdir()) == sorted(f"{n}.json" for n in listed_shards(info))


def _mixed_copy(tmp_path: Path, logmel: SimpleNamespace, reseeded: SimpleNamespace, foreign: list[str]) -> Path:
    """The logmel set with `foreign` shards and their records taken from the reseeded run (what the old job
    left after a killed re-run with another seed): dataset.json and index.parquet still describe seed 5."""
    mixed = tmp_path / "mixed"
    shutil.copytree(logmel.output, mixed)
    for name in foreign:
        shutil.copy(reseeded.output / name, mixed / name)
        shutil.copy(reseeded.output / "_records" / f"{name}.json", mixed / "_records" / f"{name}.json")
    return mixed


def test_a_mixed_set_is_flagged_by_inspect_and_refused_by_the_loader(tmp_path, logmel, reseeded, capsys):
    foreign = ["train-e00-000001.tar", "train-e01-000003.tar"]
    mixed = _mixed_copy(tmp_path, logmel, reseeded, foreign)
    text = summarize(str(mixed))
    assert "MISMATCH       2 of 11 shards" in text, text
    assert sslam(["inspect", str(mixed)]) == 1
    assert "sslam inspect: 2 of 11 shards were written by another plan" in capsys.readouterr().err
    assert all(f"  {name}: record of fingerprint {reseeded.summary['fingerprint'][:12]}" in text for name in foreign)

    # The index of the other run for those shards (index.parquet and dataset.json of different runs).
    index = pq.read_table(mixed / "index.parquet")
    other = pq.read_table(reseeded.output / "index.parquet")
    chosen = pa.array(foreign)
    doctored = pa.concat_tables([
        index.filter(pc.invert(pc.is_in(index.column("shard"), chosen))),
        other.filter(pc.is_in(other.column("shard"), chosen)),
    ])
    pq.write_table(doctored, mixed / "index.parquet")
    assert "index rows of fingerprint" in summarize(str(mixed))
    source = ShardSource(str(mixed))
    with pytest.raises(MixedShardSetError, match="train-e00-000001.tar"):
        source.sample_counts(source.shard_names("train", 0))
    loader_cfg = LoaderConfig(shards=str(mixed), micro_batch_clips=6, num_workers=0)
    with pytest.raises(MixedShardSetError, match="train-e01-000003.tar"):
        TrainLoader(loader_cfg, "train", rank=0, world_size=1, epoch=1)
    (mixed / "train-e00-000002.tar").unlink()
    assert sslam(["inspect", str(mixed)]) == 1
    assert "sslam inspect: 1 listed shards missing" in capsys.readouterr().err
    assert len(EvalLoader(loader_cfg, "eval").source.shard_names("eval", 0)) == 3  # the eval shards are its own

    # A shard that an index with fingerprints does not list, but that holds samples, is refused too.
    without = doctored.filter(pc.invert(pc.equal(doctored.column("shard"), "eval-e00-000001.tar")))
    pq.write_table(without, mixed / "index.parquet")
    with pytest.raises(MixedShardSetError, match="eval-e00-000001.tar: not in the index"):
        EvalLoader(loader_cfg, "eval")
    # The untouched set passes.
    untouched = ShardSource(str(logmel.output))
    assert sum(untouched.sample_counts(untouched.shard_names("train", 0))) == 12


def test_a_run_on_a_locked_output_exits_3_naming_the_holder_and_touches_nothing(logmel, capsys):
    stamps = _stamps(logmel.output)
    with OutputLock(storage.locate(str(logmel.output))):
        assert main(["--config", _job_yaml(logmel), "--no-progress"]) == 3
    error = capsys.readouterr().err
    assert f"pid {os.getpid()}" in error and f"host {socket.gethostname()}" in error and "started 20" in error
    assert _stamps(logmel.output) == stamps
    assert run_preprocess(logmel.config, progress=False)["nothing_to_do"] is True  # released


def test_two_runs_at_once_one_is_refused_and_the_set_is_a_single_runs(tmp_path, sample, logmel):
    output = tmp_path / "shards"
    config = load_config(str(write_config(tmp_path / "job.yaml", sample.root, str(output))))
    start = threading.Barrier(2)
    outcomes: list = [None, None]

    def run(slot: int) -> None:
        start.wait()
        try:
            outcomes[slot] = run_preprocess(config, progress=False)
        except OutputLockedError as error:
            outcomes[slot] = error

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    refused = [outcome for outcome in outcomes if isinstance(outcome, OutputLockedError)]
    finished = [outcome for outcome in outcomes if isinstance(outcome, dict)]
    assert len(refused) == 1 and len(finished) == 1, outcomes
    assert refused[0].holder["pid"] == os.getpid()
    assert finished[0]["shards"]["written"] == len(_tar_bytes(logmel.output)) == 11
    assert _tar_bytes(output) == _tar_bytes(logmel.output)
    assert pq.read_table(output / "index.parquet").equals(pq.read_table(logmel.output / "index.parquet"))


def _shards_reading(output: Path, key: str) -> set[str]:
    plan = pq.read_table(output / "plan.parquet").to_pylist()
    return {shard_name(row["split"], row["epoch"], row["shard"]) for row in plan if row["key"] == key}


def test_a_repaired_or_changed_source_file_is_processed_again(tmp_path, sample, local_ray):
    """Tried: repair a broken (empty) file after a finished run, re-run; then change a file's bytes keeping its
    size and mtime. Survives: exactly the shards that read the file are rebuilt, the set equals a fresh run over
    the repaired data, the ledger counts the clip as written; same-stat changes need hash_sources_on_resume."""
    data = tmp_path / "sample"
    shutil.copytree(sample.root, data)
    output = tmp_path / "shards"
    config = load_config(str(write_config(tmp_path / "job.yaml", data, str(output))))
    first = run_preprocess(config, progress=False)
    assert first["ledger"]["train"]["0"]["quarantined"] == 5
    repaired = sample.broken["empty"]
    touched = _shards_reading(output, repaired)
    before = _tar_bytes(output)
    noise = np.random.default_rng(3).uniform(-0.3, 0.3, 3 * 16000).astype(np.float32)
    soundfile.write(data / "audio" / f"{repaired}.wav", noise, 16000)

    second = run_preprocess(config, progress=False)
    assert second["shards"]["written"] == second["shards"]["changed_sources"] == len(touched) >= EPOCHS
    after = _tar_bytes(output)
    assert {name for name in after if after[name] != before[name]} == touched
    for epoch in map(str, range(EPOCHS)):
        counts = second["ledger"]["train"][epoch]
        assert (counts["manifest"], counts["primaries"], counts["quarantined"]) == (35, 31, 4)
    assert repaired not in pq.read_table(output / "quarantine.parquet").column("key").to_pylist()
    fresh = run_preprocess(load_config(str(write_config(tmp_path / "fresh.yaml", data, str(tmp_path / "fresh")))),
                           progress=False)
    assert after == _tar_bytes(tmp_path / "fresh")
    assert pq.read_table(output / "index.parquet").equals(pq.read_table(tmp_path / "fresh" / "index.parquet"))
    assert second["ledger"] == fresh["ledger"]

    hashing = copy.deepcopy(config)
    hashing.data.shards.hash_sources_on_resume = True
    assert run_preprocess(hashing, progress=False)["shards"]["written"] == len(after)  # records had no hashes yet
    assert _tar_bytes(output) == after
    broken = set(sample.broken.values())
    victim = next(p for p in sorted((data / "audio").glob("*.wav")) if p.stem not in broken)
    stat = victim.stat()
    content = bytearray(victim.read_bytes())
    content[len(content) // 2 :] = bytes(len(content) - len(content) // 2)  # silence the second half
    victim.write_bytes(bytes(content))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run_preprocess(config, progress=False)["shards"]["written"] == 0  # same size and mtime: not seen
    rehashed = run_preprocess(hashing, progress=False)
    assert rehashed["shards"]["written"] == rehashed["shards"]["changed_sources"]
    assert rehashed["shards"]["written"] == len(_shards_reading(output, victim.stem)) >= EPOCHS


def test_changed_sources_compares_size_mtime_and_optionally_the_hash():
    recorded = {"a": [10, 5, "h1"], "b": [10, 5], "c": [3, 1]}
    assert changed_sources(recorded, {"a": [10, 5], "b": [10, 5], "c": [3, 2]}, False) == ["c"]
    assert changed_sources(recorded, {"a": [10, 5, "h2"], "b": [10, 5, "h"]}, True) == ["a", "b"]
    assert changed_sources(recorded, {"a": None, "d": [1, 1]}, False) == ["a", "d"]
