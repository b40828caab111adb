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
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml

from jobs.config import load_config
from jobs.preprocess import main, run_preprocess
from pipeline import audio, shards
from pipeline.config import AudioConfig, MixingConfig, SynthConfig
from pipeline.inspect import listed_shards, render_groups, summarize
from pipeline.mixing import nomix_rows
from pipeline.preprocess import LedgerError, ShardJob, check_ledger, finished_record, process_shard
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
    index = shards.read_table(str(logmel.output), "index.parquet")
    quarantine = shards.read_table(str(logmel.output), "quarantine.parquet")
    manifest = pq.read_table(logmel.output / "manifest.parquet")
    dropped = index.slice(1)
    lost = [k for k, f in zip(index.column("clips")[0].as_py(), index.column("filler")[0].as_py()) if not f]
    with pytest.raises(LedgerError, match=lost[0]):
        check_ledger(manifest, dropped, quarantine, EPOCHS)


def test_rerun_of_a_finished_job_does_nothing(logmel):
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(logmel.output / "*"))}
    summary = run_preprocess(logmel.config, progress=False)
    assert summary["nothing_to_do"] is True
    assert summary["shards"]["written"] == 0
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(str(logmel.output / "*"))} == stamps


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


def test_inspect_summary_and_rendering(logmel, tmp_path):
    text = summarize(str(logmel.output))
    assert "groups of 3" in text and "0 missing" in text
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
    assert shards.is_published(str(tmp_path / "out"), job.name, record["sha256"])
    assert finished_record(shards.locate(str(tmp_path / "out")), job.name, "test") == record


def test_records_on_an_object_store_url_need_the_done_marker(tmp_path, sample):
    output = f"memory://preprocess-test-{uuid.uuid4().hex}"
    job, _, _ = _unit_job(tmp_path, sample, output)
    record = process_shard(job)
    location = shards.locate(output)
    assert location.filesystem is not None
    assert finished_record(location, job.name, "test") == record
    assert finished_record(location, job.name, "another fingerprint") is None
    location.filesystem.delete_file(location.join(job.name + shards.DONE_SUFFIX))
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
