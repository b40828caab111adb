"""jobs.mlops.tracking: the project-level store, a tracked run's params / tags / artifacts / metrics / system metrics,
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

from jobs.train.checkpointing import manifest_for_files
from jobs.train.config import ConfigError, flatten, load_config
from jobs.mlops.lineage import shard_location_uri, system_metrics_interval
from jobs.mlops.client import ensure_experiment, mlflow_client, tracking_uri
from jobs.mlops.preview import render_preview
from jobs.mlops.tracking import DROPPED_METRIC, NullTracker, Tracker
from registry_support import use_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A clean MLflow environment whose project-level store lands in tmp_path."""
    use_store(monkeypatch, tmp_path, signing_key=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
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


SHARD_SET = {
    "name": "tiny_set", "fingerprint": "f" * 64, "bytes": 3000, "mixture_epochs": 2, "target_length": 512,
    "mel_bins": 64, "classes": [{"index": i} for i in range(5)],
    "splits": {
        "train": {"mix": True, "shards_per_epoch": {"0": ["a", "b"], "1": ["c", "d"]}, "samples": 40, "clips": 120,
                  "bytes": 2000},
        "eval": {"mix": False, "shards_per_epoch": {"0": ["e"]}, "samples": 10, "clips": 10, "bytes": 1000},
    },
}


def test_a_short_run_has_lineage_its_shard_set_and_a_system_metrics_sample(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")  # scaled to the run: 1 s, longer than this run
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    (store / "shards").mkdir()
    config = load_config("tiny_stage1", ["train.output_dir=runs/short", "data.loader.shards=shards"])
    tracker = Tracker.start(config, dataset_info=SHARD_SET)
    tracker.log_metrics({"loss": 1.0}, 1)
    time.sleep(0.3)
    tracker.finish()

    run = mlflow_client().get_run(tracker.run_id)
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics)  # the sample taken at finish
    tags = run.data.tags
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("jobs.pretrain", "LOCAL")
    assert (tags["mlflow.user"], tags["mlflow.source.git.commit"]) == ("alice", commit)
    [shard_set] = run.inputs.dataset_inputs
    assert {t.key: t.value for t in shard_set.tags} == {"mlflow.data.context": "training"}
    dataset = shard_set.dataset
    assert (dataset.name, dataset.digest, dataset.source_type) == ("tiny_set", "f" * 36, "local")
    assert json.loads(dataset.source) == {"uri": (store / "shards").as_uri()}
    profile = json.loads(dataset.profile)
    assert (profile["fingerprint"], profile["shards"], profile["samples"], profile["clips"]) == ("f" * 64, 5, 50, 130)
    assert (profile["bytes"], profile["classes"], profile["mixture_epochs"]) == (3000, 5, 2)
    assert profile["splits"]["train"] == {"shards": 4, "samples": 40, "clips": 120, "bytes": 2000, "mix": True}
    features = json.loads(json.loads(dataset.schema)["mlflow_tensorspec"]["features"])
    assert features[0]["tensor-spec"]["shape"] == [-1, 1, 512, 64]


def test_system_metrics_interval_scales_with_the_run_unless_configured():
    assert [system_metrics_interval(s) for s in (0.0, 3.0, 60.0, 150.0, 7200.0)] == [1.0, 1.0, 3.0, 7.5, 10.0]
    assert system_metrics_interval(7200.0, configured_s=0.5) == 0.5
    assert load_config("tiny_stage1", ["tracking.system_metrics_interval_s=2.5"]).tracking.system_metrics_interval_s == 2.5
    with pytest.raises(ConfigError, match="system_metrics_interval_s"):
        load_config("tiny_stage1", ["tracking.system_metrics_interval_s=-1"])


def test_shard_location_uri_keeps_urls_and_resolves_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shard_location_uri("s3://bucket/shards") == ("s3", "s3://bucket/shards")
    assert shard_location_uri("https://host/s/{000..003}.tar") == ("https", "https://host/s/{000..003}.tar")
    assert shard_location_uri("shards") == ("local", (tmp_path / "shards").as_uri())


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


def test_an_artifact_store_that_refuses_writes_ends_tracking_and_fails_the_run(store, caplog):
    """The artifact location lies under a regular file (so the refusal also happens as root, who ignores
    permissions): the first artifact write fails with an OS error."""
    blocker = store / "blocker"
    blocker.write_text("a file where the artifact folder should be")
    client = mlflow_client()
    client.create_experiment("sslam", artifact_location=(blocker / "artifacts").as_uri())
    config = load_config("tiny_stage1", ["train.output_dir=runs/ro", "tracking.system_metrics=false",
                                         "tracking.retry_interval_s=0.2", "tracking.finish_timeout_s=20"])
    caplog.set_level(logging.WARNING, logger="sslam.tracking")
    tracker = Tracker.start(config, ds_config={"train_batch_size": 6}, dataset_info={"fingerprint": "ro"})
    assert tracker.flush(timeout_s=30)  # nothing is left waiting: the refusal ended tracking
    assert tracker.refused is not None and "refused to log config.yaml" in tracker.refused
    durations = []
    for step in range(1, 101):  # training goes on; its metrics are no longer sent
        started = time.perf_counter()
        tracker.log_metrics({"loss": 1.0 / step}, step)
        durations.append(time.perf_counter() - started)
    assert max(durations) < 0.05
    started = time.perf_counter()
    tracker.finish()
    assert time.perf_counter() - started < 10

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["sslam.tracking_error"] == tracker.refused
    assert "Error" in tracker.refused  # the OS error's type, e.g. NotADirectoryError / FileExistsError
    assert run.data.params["model.embed_dim"] == "32"  # what was taken before the refusal stays
    ended = [r for r in caplog.records if "tracking of this run ends here" in r.getMessage()]
    assert len(ended) == 1
    assert any("is marked FAILED" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if "is unreachable" in r.getMessage()]  # refused, not retried


class RefusingServer:
    """A stand-in MLflow server that keeps one run and answers 403 to every artifact upload (and, with
    `refuse_all`, to every call): records the run's status and tags."""

    def __init__(self, refuse_all: bool = False) -> None:
        import http.server
        import threading

        self.refuse_all = refuse_all
        self.status = None
        self.tags: dict[str, str] = {}
        self.refused: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if "mlflow-artifacts" not in self.path else {}
                path = self.path.split("?")[0]
                if server.refuse_all or "mlflow-artifacts" in path:
                    server.refused.append(f"{self.command} {path}")
                    return self.answer(403, {"error_code": "PERMISSION_DENIED", "message": "read-only store"})
                info = {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "status": server.status or "RUNNING",
                        "artifact_uri": "mlflow-artifacts:/1/r1/artifacts", "lifecycle_stage": "active",
                        "start_time": 1, "user_id": "u"}
                run = {"info": info, "data": {"tags": [{"key": k, "value": v} for k, v in server.tags.items()]}}
                if path.endswith("/experiments/get-by-name"):
                    return self.answer(200, {"experiment": {"experiment_id": "1", "name": "sslam",
                                                            "artifact_location": "mlflow-artifacts:/1",
                                                            "lifecycle_stage": "active"}})
                if path.endswith("/runs/create") or path.endswith("/runs/get"):
                    return self.answer(200, {"run": run})
                if path.endswith("/runs/set-tag"):
                    server.tags[body["key"]] = body["value"]
                    return self.answer(200, {})
                if path.endswith("/runs/update"):
                    server.status = body.get("status")
                    return self.answer(200, {"run_info": info})
                if path.endswith("/runs/log-batch"):
                    return self.answer(200, {})
                return self.answer(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": path})

            do_GET = do_POST = do_PUT = do_PATCH = handle_any

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("refuse_all", [False, True], ids=["artifacts-refused", "everything-refused"])
def test_a_server_that_refuses_writes_ends_tracking(store, monkeypatch, caplog, refuse_all):
    server = RefusingServer(refuse_all=refuse_all)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        config = load_config("tiny_stage1", ["train.output_dir=runs/srv", "tracking.system_metrics=false",
                                             "tracking.retry_interval_s=0.2", "tracking.finish_timeout_s=20"])
        caplog.set_level(logging.WARNING, logger="sslam.tracking")
        tracker = Tracker.start(config, ds_config={"train_batch_size": 6})
        for step in range(1, 21):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        assert tracker.flush(timeout_s=30)
        started = time.perf_counter()
        tracker.finish()
        assert time.perf_counter() - started < 10
    finally:
        server.stop()
    assert server.refused and tracker.refused is not None and "PERMISSION_DENIED" in tracker.refused
    assert len([r for r in caplog.records if "tracking of this run ends here" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if "is unreachable" in r.getMessage()]
    if refuse_all:  # not even the run could be created: the warning says the run could not be marked
        assert tracker.run_id is None and server.status is None
        assert any("could not be marked FAILED" in r.getMessage() for r in caplog.records)
    else:
        assert "refused to log config.yaml" in tracker.refused
        assert server.status == "FAILED" and server.tags["sslam.tracking_error"] == tracker.refused
