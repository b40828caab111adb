"""jobs.tracking: the project-level store, a tracked run's params / tags / artifacts / metrics / system metrics,
the batch preview, and a tracker whose server is unreachable (never blocks, drops oldest, warns once)."""

from __future__ import annotations

import json
import logging
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch

from jobs.checkpointing import manifest_for_files
from jobs.config import flatten, load_config
from jobs.tracking import (
    DROPPED_METRIC,
    HTTP_DEFAULTS,
    NullTracker,
    Tracker,
    ensure_experiment,
    mlflow_client,
    render_preview,
    tracking_uri,
)

REPO = Path(__file__).resolve().parents[1]
# Cleared for each test (and restored after): Tracker.start sets the HTTP ones for its process.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
              "MLFLOW_RUN_ID", *HTTP_DEFAULTS)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A clean MLflow environment whose project-level store lands in tmp_path."""
    for name in MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def stage2_batch(cfg, clips: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    frames, bins, patch = cfg.model.target_length, cfg.model.mel_bins, cfg.model.patch_size
    nomix = torch.zeros(clips, frames // patch, dtype=torch.bool)
    nomix[:, 2:9] = True
    nomix[:, 20:27] = True
    return {
        "clean": -4.0 + 3.0 * torch.randn(clips, 1, frames, bins, generator=gen),
        "mixed": -4.0 + 3.0 * torch.randn(clips, 1, frames, bins, generator=gen),
        "partner": torch.tensor([(i - 1) % 3 + 3 * (i // 3) for i in range(clips)]),
        "nomix": nomix,
    }


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_default_store_is_project_level_sqlite_with_artifact_root(store):
    assert tracking_uri() == f"sqlite:///{store / 'mlruns' / 'mlflow.db'}"
    client = mlflow_client()
    experiment_id = ensure_experiment(client, "sslam")
    assert ensure_experiment(client, "sslam") == experiment_id
    experiment = client.get_experiment(experiment_id)
    assert experiment.artifact_location == (store / "mlruns" / "artifacts").as_uri()
    assert (store / "mlruns" / "mlflow.db").is_file()


def test_tracker_logs_params_tags_artifacts_metrics_and_system_metrics(store):
    long_root = "x" * 7000  # longer than MLflow's param limit
    config = load_config("tiny_stage1", [f"data.source.audio_root={long_root}", "train.output_dir=runs/t",
                                         "tracking.run_name=tracked"])
    dataset_info = {"fingerprint": "abc123", "splits": {}, "classes": []}
    started = time.perf_counter()
    tracker = Tracker.start(config, ds_config={"train_batch_size": 6}, dataset_info=dataset_info, world_size=4)
    assert time.perf_counter() - started < 1.0  # nothing waits for MLflow
    for step in range(1, 31):
        tracker.log_metrics({"loss": 10.0 / step, "lr": 1e-3}, step)
    tracker.log_preview(stage2_batch(config))
    time.sleep(1.5)  # one system-metrics sample at MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=1
    assert tracker.flush(timeout_s=30)
    tracker.finish()

    client = mlflow_client()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tracked"
    assert run.info.experiment_id == ensure_experiment(client, config.tracking.experiment)
    params = run.data.params
    assert set(params) == set(flatten(config))
    assert params["model.embed_dim"] == "32" and params["train.betas"] == "[0.9, 0.95]"
    assert len(params["data.source.audio_root"]) == 6000 and params["data.source.audio_root"].endswith("[truncated]")
    tags = run.data.tags
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["git_commit"] == commit
    assert (tags["dataset_fingerprint"], tags["stage"], tags["world_size"]) == ("abc123", "1", "4")
    assert tags["encoder"] == "vit-32-2"
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 31))
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics)
    assert DROPPED_METRIC not in run.data.metrics

    artifacts = {a.path for a in client.list_artifacts(tracker.run_id, "config")}
    assert artifacts == {"config/config.yaml", "config/deepspeed_config.json", "config/dataset.json"}
    local = Path(client.download_artifacts(tracker.run_id, "config", str(store / "download")))
    assert load_config(str(local / "config.yaml")) == config
    assert json.loads((local / "dataset.json").read_text())["fingerprint"] == "abc123"
    preview = Path(client.download_artifacts(tracker.run_id, "preview/preview.png", str(store / "download")))
    width, height = png_size(preview.read_bytes())
    assert width > 600 and height > 400
    assert json.loads((store / "runs" / "t" / "mlflow_run.json").read_text())["run_id"] == tracker.run_id


def test_resumed_training_continues_its_run(store):
    config = load_config("tiny_stage1", ["train.output_dir=runs/r", "tracking.system_metrics=false"])
    first = Tracker.start(config)
    first.log_metrics({"loss": 2.0}, 1)
    first.finish("KILLED")
    fresh = Tracker.start(config)  # no checkpoint to resume from: a new run
    assert fresh.flush(timeout_s=30) and fresh.run_id != first.run_id
    fresh.finish("KILLED")
    checkpoint = store / "runs" / "r" / "checkpoints" / "update_00000001"
    checkpoint.mkdir(parents=True)
    manifest_for_files(checkpoint)  # a complete checkpoint: training resumes from it
    resumed = Tracker.start(config)
    resumed.log_metrics({"loss": 1.0}, 2)
    resumed.finish()
    assert resumed.run_id == fresh.run_id
    history = mlflow_client().get_metric_history(fresh.run_id, "loss")
    assert [m.step for m in history] == [2]
    assert mlflow_client().get_run(fresh.run_id).info.status == "FINISHED"


def test_preview_of_stage1_and_stage2_batches(tmp_path):
    config = load_config("tiny_stage1")
    two = render_preview(stage2_batch(config), config.model, tmp_path / "two.png")
    one = render_preview({"clean": stage2_batch(config)["clean"]}, config.model, tmp_path / "one.png")
    (w2, h2), (w1, h1) = png_size(two.read_bytes()), png_size(one.read_bytes())
    assert w1 == w2 and h2 > h1  # the mixture row is only drawn for stage-2 batches


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_never_blocks_drops_oldest_and_warns_once(store, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    config = load_config("tiny_stage1", ["train.output_dir=runs/t", "tracking.queue_size=50",
                                         "tracking.retry_interval_s=0.2", "tracking.finish_timeout_s=2",
                                         "tracking.system_metrics=false"])
    caplog.set_level(logging.WARNING, logger="sslam.tracking")
    tracker = Tracker.start(config, dataset_info={"fingerprint": "f"})
    durations = []
    for step in range(200):
        started = time.perf_counter()
        tracker.log_metrics({"loss": float(step)}, step)
        durations.append(time.perf_counter() - started)
        if step % 50 == 0:
            time.sleep(0.5)  # let the thread try (and fail) a few times
    assert max(durations) < 0.05
    assert 150 <= tracker.dropped_metrics <= 200
    started = time.perf_counter()
    tracker.finish()
    assert time.perf_counter() - started < 10
    unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    assert not [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert tracker.run_id is None


def test_null_tracker_accepts_every_call(tmp_path):
    tracker = NullTracker()
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_preview({"clean": torch.zeros(1, 1, 16, 16)})
    tracker.on_checkpoint(tmp_path, 1)
    assert tracker.flush()
    tracker.finish("FAILED")
