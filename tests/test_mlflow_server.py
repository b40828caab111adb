"""The tracker and the registry against a real `mlflow server` (127.0.0.1, temporary SQLite backend, served
artifacts): the normal flow, then the server stopped mid-run (logging calls stay fast, nothing is lost, the
registration stays pending) and restarted (the pending registration and the queued metrics go through)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from jobs.mlops import registration, registry
from jobs.train.config import load_config
from jobs.mlops.client import mlflow_client
from jobs.mlops.tracking import HTTP_DEFAULTS, Tracker
from model.features import extract_features
from model.sslam import SSLAM
from registry_support import seeded_checkpoint

pytestmark = pytest.mark.slow

MLFLOW = Path(sys.executable).parent / "mlflow"
MODEL = "sslam-encoder"
CLEARED = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
           "MLFLOW_RUN_ID", *HTTP_DEFAULTS)
STARTUP_TIMEOUT_S = 120
CPU = {"device": "cpu"}  # compared with CPU results below, also on a GPU machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mlflow server` in its own process group, on a fixed port, backend and artifact folder (restartable)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        command = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                   "--artifacts-destination", str(self.root / "server-artifacts")]
        log = open(self.root / "server.log", "ab")
        self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer within {STARTUP_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)


@pytest.fixture
def server(tmp_path, monkeypatch):
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    running = Server(tmp_path)
    try:
        running.start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", running.uri)
        monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        yield running
    finally:
        running.stop()


def checkpoint(run_dir: Path, config, updates: int) -> tuple[Path, SSLAM]:
    """A checkpoint folder of a seeded model as jobs.pretrain leaves one (config.yaml, student.safetensors)."""
    return seeded_checkpoint(run_dir, config, updates)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_tracking_and_registry_survive_a_server_outage(server):
    config = load_config("tiny_stage1", ["train.output_dir=runs/srv", "tracking.register=every_checkpoint",
                                         "tracking.aliases=[candidate]",
                                         "tracking.retry_interval_s=0.5", "tracking.finish_timeout_s=60"])
    run_dir = Path("runs/srv")
    tag10, _ = checkpoint(run_dir, config, 10)
    tag20, _ = checkpoint(run_dir, config, 20)
    tag30, model30 = checkpoint(run_dir, config, 30)
    tracker = Tracker.start(config, ds_config={"zero_optimization": {"stage": 2}}, dataset_info={"fingerprint": "srv"})
    for step in range(1, 6):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    tracker.on_checkpoint(tag10, 10)
    assert tracker.flush(timeout_s=120)
    client = mlflow_client(server.uri)
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == "1"
    assert client.get_run(tracker.run_id).data.params["model.embed_dim"] == "32"

    server.stop()
    durations = []
    for step in range(6, 26):
        started = time.perf_counter()
        tracker.log_metrics({"loss": 1.0 / step}, step)
        durations.append(time.perf_counter() - started)
        time.sleep(0.1)
    started = time.perf_counter()
    tracker.on_checkpoint(tag20, 20)  # exports locally; the registration fails in the background
    assert time.perf_counter() - started < 15
    tracker.wait_exports()  # the export runs on its own thread
    assert max(durations) < 2.0
    pending = run_dir / "registrations" / tag20.name / registration.PENDING_FILE
    wait_for(lambda: json.loads(pending.read_text())["last_error"], 60, "the failed registration attempt")
    assert (pending.parent / registration.MODEL_DIR / "MLmodel").is_file()
    assert not tracker.flush(timeout_s=1)  # metrics are waiting, not lost
    assert tracker.dropped_metrics == 0

    server.start()
    versions = registry.register_pending(run_dir)  # `sslam register RUN_DIR`
    assert [v.tags["update"] for v in versions] == ["20"]
    assert not pending.exists() and (pending.parent / registration.DONE_FILE).is_file()
    tracker.on_checkpoint(tag30, 30)  # the next checkpoint registers too
    assert tracker.flush(timeout_s=120)
    tracker.finish()

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == list(range(1, 26))
    assert any(key.startswith("system/") for key in run.data.metrics)
    versions = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert [v.tags["update"] for v in versions] == ["10", "20", "30"]
    assert all(v.run_id == tracker.run_id for v in versions)
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == "3"

    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate", model_config=CPU)
    fbank = -4.0 + 3.0 * torch.randn(2, 512, 64)
    predicted = loaded.predict(pd.DataFrame({"fbank": [f.tolist() for f in fbank]}))
    expected = extract_features(model30.encoder, fbank)
    np.testing.assert_allclose(predicted["utterance"], expected["utterance"].numpy(), atol=1e-5)
