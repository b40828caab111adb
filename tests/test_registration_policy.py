"""Registration policy (jobs.mlops.tracking, jobs.mlops.registry, TrackingConfig): which checkpoints of a run become versions
(`tracking.register`: never | end | every_checkpoint) and which aliases a run moves (`tracking.aliases`, none by
default): a smoke run next to a real one leaves `candidate` where it was. In-process trackers, no launch."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import pytest

from jobs import register as register_job
from jobs.mlops import registration
from jobs.train import checkpointing
from jobs.train.config import ConfigError, TrackingConfig, load_config
from jobs.mlops.client import mlflow_client
from jobs.mlops.tracking import Tracker
from registry_support import seeded_checkpoint, use_store

MODEL = "sslam-policy"


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A project-level store and a signing key of its own in tmp_path."""
    use_store(monkeypatch, tmp_path)
    return tmp_path


def run_config(name: str, *overrides: str):
    return load_config("tiny_stage1", [f"train.output_dir=runs/{name}", f"tracking.model_name={MODEL}",
                                       "tracking.system_metrics=false", *overrides])


def checkpoint(config, updates: int) -> Path:
    """A checkpoint folder of a seeded model (config.yaml + student.safetensors), as jobs.pretrain leaves one."""
    return seeded_checkpoint(Path(config.train.output_dir), config, updates)[0]


def train(config, checkpoints: list[int], status: str = "FINISHED") -> str:
    """What jobs.pretrain does with its tracker: on_checkpoint after each checkpoint, finish at the end."""
    tracker = Tracker.start(config, dataset_info={"fingerprint": "policy"})
    for updates in checkpoints:
        tracker.log_metrics({"loss": 1.0 / updates}, updates)
        tracker.on_checkpoint(checkpoint(config, updates), updates)
    tracker.finish(status)
    return tracker.run_id


def versions_of(run_id: str) -> list[tuple[str, list[str]]]:
    """(update, aliases) of the run's versions, oldest first."""
    client = mlflow_client()
    found = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    return [(v.tags["update"], sorted(client.get_model_version(MODEL, v.version).aliases))
            for v in found if v.run_id == run_id]


def test_presets_register_at_the_end_and_only_base_presets_move_candidate():
    for name in ("base_stage1", "base_stage2"):
        tracking = load_config(name).tracking
        assert (tracking.register, tracking.aliases) == ("end", ["candidate"]), name
    for name in ("tiny_stage1", "tiny_stage2", "sample", "probe", "audioset"):
        tracking = load_config(name).tracking
        assert (tracking.register, tracking.aliases) == ("end", []), name
    # A config of one's own without a tracking section moves nothing either.
    assert (TrackingConfig().register, TrackingConfig().aliases) == ("end", [])


@pytest.mark.parametrize("aliases, message", [
    ("[latest]", "'latest' (MLflow reserves it"),
    ("[Latest]", "'Latest' (MLflow reserves it"),
    ("[candidate, best]", "'best' (moved only by `sslam evaluate --promote`"),
    ("[v3]", "'v3' is not an MLflow alias"),
    ("['a b']", "'a b' is not an MLflow alias"),
    ("['']", "'' is not an MLflow alias"),
    ("[candidate, candidate]", "names an alias twice"),
])
def test_aliases_a_run_may_not_move_are_refused_at_load(aliases, message):
    with pytest.raises(ConfigError) as error:
        load_config("base_stage1", [f"tracking.aliases={aliases}"])
    assert "tracking.aliases" in str(error.value) and message in str(error.value)
    assert "base_stage1.yaml" in str(error.value)


def test_register_is_an_enum_checked_at_load():
    with pytest.raises(ConfigError, match="'tracking.register' must be one of 'never', 'end', 'every_checkpoint', got"):
        load_config("tiny_stage1", ["tracking.register=always"])
    with pytest.raises(ConfigError, match="unknown key 'tracking.register_every_checkpoint'"):
        load_config("tiny_stage1", ["tracking.register_every_checkpoint=true"])


def test_a_smoke_run_next_to_a_real_one_leaves_candidate_where_it_was(store):
    """Tried: a real run (a base preset's policy: register at the end, alias candidate) with two checkpoints, then
    a smoke run (a tiny preset / ad-hoc override: no aliases) in the same store, then runs with register
    every_checkpoint and never. Survives: candidate stays on the real run's last checkpoint; `end` registered only
    the final checkpoint, `every_checkpoint` each, `never` none; a FAILED run registers nothing at the end."""
    client = mlflow_client()
    real = train(run_config("real", "tracking.aliases=[candidate]"), [20, 40])
    assert versions_of(real) == [("40", ["candidate"])]
    held = client.get_model_version_by_alias(MODEL, "candidate").version

    smoke = train(run_config("smoke", "train.max_updates=10"), [10])
    assert versions_of(smoke) == [("10", [])]  # registered, nothing moved
    assert client.get_model_version_by_alias(MODEL, "candidate").version == held

    each = train(run_config("each", "tracking.register=every_checkpoint", "tracking.aliases=[staging]"), [5, 10])
    assert versions_of(each) == [("5", []), ("10", ["staging"])]
    assert client.get_model_version_by_alias(MODEL, "candidate").version == held

    never = train(run_config("never", "tracking.register=never", "tracking.aliases=[candidate]"), [5])
    assert versions_of(never) == []
    assert not registration.registrations_dir("runs/never").exists()
    failed = train(run_config("failed", "tracking.aliases=[candidate]"), [5], status="FAILED")
    assert versions_of(failed) == []
    assert client.get_model_version_by_alias(MODEL, "candidate").version == held
    assert registration.pending_folders("runs/real") == registration.pending_folders("runs/each") == []


def test_sslam_register_moves_the_aliases_it_is_given(store, capsys):
    """`sslam register --checkpoint` defaults to its run's tracking.aliases; --alias names others; best and latest
    are refused before anything is exported."""
    client = mlflow_client()
    tiny = checkpoint(run_config("tiny"), 3)
    assert register_job.main(["--checkpoint", str(tiny)]) == 0
    [version] = client.search_model_versions(f"name = '{MODEL}'")
    assert client.get_model_version(MODEL, version.version).aliases == []
    base_like = checkpoint(run_config("base_like", "tracking.aliases=[candidate]"), 4)
    assert register_job.main(["--checkpoint", str(base_like)]) == 0
    assert client.get_model_version_by_alias(MODEL, "candidate").tags["update"] == "4"
    bad = checkpoint(run_config("bad"), 5)
    assert register_job.main(["--checkpoint", str(bad), "--alias", "best"]) == 1
    assert "evaluate --promote" in capsys.readouterr().err
    assert not registration.registrations_dir("runs/bad").exists()
    with pytest.raises(SystemExit):
        register_job.main(["runs/tiny", "--alias", "candidate"])


def test_a_checkpoint_export_runs_off_the_training_thread_and_is_awaited_at_the_end(store, monkeypatch):
    """A slow exporter: on_checkpoint (rank 0's step after a save) returns while the export still runs; the next
    checkpoint's wait and `finish` join it, and the export it staged is registered at the end."""
    started, release, finished, gave_up = (threading.Event() for _ in range(4))
    export = registration.export_checkpoint

    def slow_export(*args, **kwargs):
        started.set()
        if not release.wait(20):  # on_checkpoint did not return while this ran
            gave_up.set()
        folder = export(*args, **kwargs)
        finished.set()
        return folder

    monkeypatch.setattr(registration, "export_checkpoint", slow_export)
    config = run_config("slow", "tracking.register=every_checkpoint")
    tracker = Tracker.start(config, dataset_info={"fingerprint": "policy"})
    tracker.on_checkpoint(checkpoint(config, 6), 6)
    assert started.wait(60) and not finished.is_set() and not gave_up.is_set()  # returned while the export runs
    release.set()
    tracker.wait_exports()
    assert finished.is_set()
    tracker.finish("FINISHED")
    assert versions_of(tracker.run_id) == [("6", [])]


def test_a_failed_export_is_logged_and_reported_at_the_end(store, monkeypatch, caplog):
    def failing_export(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(registration, "export_checkpoint", failing_export)
    config = run_config("failing", "tracking.register=every_checkpoint")
    tracker = Tracker.start(config, dataset_info={"fingerprint": "policy"})
    with caplog.at_level(logging.WARNING, logger="sslam"):
        tracker.on_checkpoint(checkpoint(config, 6), 6)
        tracker.finish("FINISHED")
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(r.getMessage().startswith("could not export") and "disk full" in str(r.exc_info[1])
               for r in caplog.records if r.exc_info)  # when it failed
    assert any("1 checkpoint exports failed" in m and "disk full" in m for m in messages)  # and at the end
    assert versions_of(tracker.run_id) == []


def test_training_exports_from_student_safetensors_only(store, monkeypatch, caplog):
    """A training process never consolidates DeepSpeed's shards (zero_to_fp32, or the pickled model states): a
    checkpoint without student.safetensors is an export failure naming the file."""
    consolidated = []
    monkeypatch.setattr(checkpointing, "consolidated_student", lambda *args: consolidated.append(args) or {})
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", None)  # importing it raises ImportError
    config = run_config("bare", "tracking.register=every_checkpoint")
    bare = seeded_checkpoint(Path(config.train.output_dir), config, 6, student=False)[0]
    tracker = Tracker.start(config, dataset_info={"fingerprint": "policy"})
    with caplog.at_level(logging.WARNING, logger="sslam"):
        tracker.on_checkpoint(bare, 6)
        tracker.on_checkpoint(checkpoint(config, 7), 7)
        tracker.finish("FINISHED")
    assert consolidated == []
    assert any(f"has no {checkpointing.STUDENT_FILE}" in r.getMessage() for r in caplog.records)
    assert versions_of(tracker.run_id) == [("7", [])]
