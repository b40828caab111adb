"""Multi-process scenarios of the preprocessing job: every run must give the shard set of one uninterrupted run.

* a SIGKILLed driver, then a re-run (resume from the published shards and their records);
* a worker that SIGKILLs itself in one task (the fault hook tests/preprocess_faults/sitecustomize.py): Ray
  retries the task, no clip is lost;
* a two-node `ray.cluster_utils.Cluster`: a plain local output path is refused; a `file://` URL (the
  operator's statement that the path is a mount every node shares) gives byte-identical shards;
* a real `ray start --head` + `ray job submit --working-dir .` of `python -m jobs.preprocess`.

The clusters started here are stopped by their own process ids (SIGTERM to `ray start --block`, which
takes its processes down, then SIGKILL to its process group), not by `ray stop`, which would end every
Ray process on the machine.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from jobs.train.config import load_config
from jobs.preprocess import run_preprocess
from pipeline.config import SynthConfig
from pipeline.inspect import listed_shards
from pipeline.preprocess_errors import PreprocessConfigError
from pipeline.synth import make_sample_dataset
from test_preprocess import write_config as write_job_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
# The fault hook (tests/preprocess_faults/sitecustomize.py) reads this; on PYTHONPATH it reaches every job process.
FAULTS_ENV = "SSLAM_PREPROCESS_FAULTS"
FAULT_HOOKS = REPO / "tests" / "preprocess_faults"
UPLOAD_EXCLUDES = [".git", ".venv", "data", "runs", "mlruns"]
MAX_UPLOAD_MIB = 10.0


def write_config(path: Path, sample: Path, output: str) -> Path:
    """The preprocessing tests' job YAML with one group per shard (many small shards)."""
    return write_job_config(path, sample, output, shards={"groups_per_shard": 1, "clips_per_eval_shard": 2, "seed": 3})


def _environment(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _faults(faults: dict) -> dict[str, str]:
    """The environment of a job whose processes install the fault hook with `faults`."""
    path = os.pathsep.join(filter(None, [str(FAULT_HOOKS), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, FAULTS_ENV: json.dumps(faults)}


def _job_command(config: Path, summary: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "jobs.preprocess", "--config", str(config), "--num-cpus", "2", "--no-progress"]
    return command + (["--summary-json", str(summary)] if summary else [])


def _run_job(config: Path, summary: Path, **env: str) -> dict:
    result = subprocess.run(
        _job_command(config, summary), cwd=REPO, env=_environment(**env), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads(summary.read_text())


def _published(output: Path) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(output / "*.tar")))


def _shard_bytes(output: Path) -> dict[str, bytes]:
    return {name: (output / name).read_bytes() for name in _published(output)}


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group of a process started with start_new_session=True."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    make_sample_dataset(root, SynthConfig(train_clips=12, eval_clips=4, seed=1))
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample) -> SimpleNamespace:
    """One uninterrupted run on a local one-node Ray (a subprocess, as an operator runs it)."""
    root = tmp_path_factory.mktemp("reference")
    output = root / "shards"
    summary = _run_job(write_config(root / "job.yaml", sample, str(output)), root / "summary.json")
    info = json.loads((output / "dataset.json").read_text())
    names = listed_shards(info)
    assert sorted(names) == _published(output) and len(names) == 14
    return SimpleNamespace(output=output, summary=summary, shards=_shard_bytes(output), info=info)


def test_driver_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, sample, reference):
    output = tmp_path / "shards"
    config = write_config(tmp_path / "job.yaml", sample, str(output))
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            _job_command(config),
            cwd=REPO,
            env=_environment(**_faults({"delay_s": 0.75})),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while len(_published(output)) < 3:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no shard published in time"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        _kill_session(driver)
    published = _published(output)
    assert 3 <= len(published) < len(reference.shards)
    assert not (output / "dataset.json").exists()

    summary = _run_job(config, tmp_path / "summary.json")
    assert summary["shards"]["skipped"] >= 2 and summary["shards"]["written"] >= 1
    assert _shard_bytes(output) == reference.shards
    assert pq.read_table(output / "index.parquet").equals(pq.read_table(reference.output / "index.parquet"))
    assert json.loads((output / "dataset.json").read_text())["checksums"] == reference.info["checksums"]
    assert not [name for name in os.listdir(output) if ".tmp-" in name]


def test_a_killed_worker_is_retried_and_no_clip_is_lost(tmp_path, sample, reference):
    output = tmp_path / "shards"
    marker = tmp_path / "killed-once"
    fault = {"kill_once": {"shard": "train-e00-000002.tar", "marker": str(marker)}}
    summary = _run_job(
        write_config(tmp_path / "job.yaml", sample, str(output)), tmp_path / "summary.json",
        **_faults(fault),
    )
    assert marker.exists()  # the first attempt died
    assert summary["shards"]["written"] == len(reference.shards)
    assert summary["ledger"] == reference.summary["ledger"]
    assert _shard_bytes(output) == reference.shards


def test_two_node_cluster_refuses_a_local_path_and_matches_one_node_on_a_shared_url(tmp_path, sample, reference):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        assert len([node for node in ray.nodes() if node["Alive"]]) == 2

        plain = tmp_path / "plain"
        config = load_config(str(write_config(tmp_path / "plain.yaml", sample, str(plain))))
        with pytest.raises(PreprocessConfigError, match="2 nodes.*file://"):
            run_preprocess(config, progress=False)
        assert not plain.exists()

        shared = tmp_path / "shared"
        config = load_config(str(write_config(tmp_path / "shared.yaml", sample, f"file://{shared}")))
        summary = run_preprocess(config, progress=False)
        assert summary["nodes"] == 2
        assert _shard_bytes(shared) == reference.shards
        assert pq.read_table(shared / "index.parquet").equals(pq.read_table(reference.output / "index.parquet"))
    finally:
        ray.shutdown()
        cluster.shutdown()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for handle in sockets:
            handle.bind(("127.0.0.1", 0))
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def _wait_for_dashboard(port: int, head: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, log.read_text()[-4000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # up, and asking for the token
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the dashboard did not come up on port {port}: {log.read_text()[-4000:]}")


def test_ray_job_submit_to_a_started_cluster(tmp_path, sample, reference):
    port, dashboard = _free_ports(2)
    # Token authentication, with a token of this test's own (nothing read from or written to ~/.ray).
    env = _environment(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    log = tmp_path / "ray-start.log"
    # A temp dir of its own keeps the cluster's address file away from other ray.init() calls on this machine
    # (short: Ray's socket paths live below it).
    temp_dir = tempfile.mkdtemp(prefix="sslam-ray-", dir="/tmp")
    with open(log, "w") as handle:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--port", str(port), "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--temp-dir", temp_dir, "--disable-usage-stats", "--block"],
            env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_for_dashboard(dashboard, head, log)
        output = tmp_path / "shards"
        config = write_config(tmp_path / "job.yaml", sample, str(output))

        def submit(*overrides: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".",
                 "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}), "--",
                 "python", "-m", "jobs.preprocess", "--config", str(config), "--no-progress", *overrides],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
            )

        result = submit()
        text = result.stdout + result.stderr
        assert result.returncode == 0, text[-6000:]
        assert "succeeded" in text and "ledger" in text
        # What Ray unpacked for the job: the sources, without the virtualenv or any data.
        (unpacked,) = [
            path for path in glob.glob(f"{temp_dir}/session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
            if os.path.isdir(path)
        ]
        entries = set(os.listdir(unpacked))
        assert {"jobs", "pipeline"} <= entries and not entries & set(UPLOAD_EXCLUDES), entries
        size = sum(p.stat().st_size for p in Path(unpacked).rglob("*") if p.is_file())
        assert size < MAX_UPLOAD_MIB * 2**20, size
        assert _shard_bytes(output) == reference.shards

        # A relative output path would land in the job's temporary copy of the working directory: refused.
        refused = submit("--set", "data.shards.output=relative/shards")
        assert refused.returncode != 0
        assert "uploaded working_dir" in refused.stdout + refused.stderr
    finally:
        head.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            head.wait(timeout=60)
        _kill_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
