"""The training job's process lifecycle on 2 CPU ranks (gloo) through the real `deepspeed` launcher and
`sslam pretrain --ranks 2`: an error on one rank ends the whole job quickly; signals end it with a checkpoint;
one job per run folder; a stale op-build lock does not block a launch. Faults are injected by
tests/reliability/faults/sitecustomize.py (SSLAM_FAULT), never by a branch in production code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from jobs.train import checkpointing, run_lock
from reliability_support import BIN, PRETRAIN, REPO, cpu_env, free_port
from shardsets import write_training_set

pytestmark = pytest.mark.slow

T, F = 128, 32
FAULTS = str(Path(__file__).resolve().parent / "faults")
ENDS_WITHIN_S = 60


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("lifecycle_shards")
    write_training_set(directory, target_length=T, mel_bins=F, num_shards=2, groups_per_shard=12)
    return directory


def settings(shards: Path, output: Path, *overrides: str) -> list[str]:
    values = [f"data.loader.shards={shards}", f"train.output_dir={output}", "data.loader.num_workers=1",
              "tracking.enabled=false", f"data.audio.target_length={T}", f"data.audio.mel_bins={F}",
              f"model.target_length={T}", f"model.mel_bins={F}", "train.record_samples=true",
              "train.max_updates=100000", "train.checkpoint_interval=100000", "train.gradient_accumulation=2",
              *overrides]
    return ["--config", "tiny_stage1", *[f"--set={v}" for v in values]]


def raw_launch(shards: Path, output: Path, *overrides: str) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), PRETRAIN,
            *settings(shards, output, *overrides)]


def cli_launch(shards: Path, output: Path, *overrides: str) -> list[str]:
    return [str(BIN / "sslam"), "pretrain", "--ranks", "2", *settings(shards, output, *overrides)]


def env(**extra: str) -> dict[str, str]:
    base = cpu_env(**extra)
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), FAULTS])
    return base


def start(command: list[str], cwd: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def session(leader: int) -> list[psutil.Process]:
    alive = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == leader and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (psutil.Error, OSError):
            continue
    return alive


def finish(process: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    time.sleep(1)
    left = [p.cmdline() for p in session(process.pid)]
    kill_session(process.pid)
    assert not left, left
    return out


def consumed(output: Path, rank: int = 0) -> int:
    path = output / f"samples_rank{rank}.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def kill_session(leader: int) -> None:
    for process in session(leader):
        try:
            process.kill()
        except psutil.Error:
            continue


def wait_for_micro_batches(process: subprocess.Popen, output: Path, count: int) -> None:
    deadline = time.monotonic() + 240
    try:
        while consumed(output) < count:
            assert process.poll() is None, process.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.1)
    except BaseException:
        kill_session(process.pid)
        raise


def launch_port(cli: subprocess.Popen) -> str:
    """The master port `sslam pretrain` gave its launcher (the /dev/shm buffers are named after it)."""
    command = psutil.Process(cli.pid).children()[0].cmdline()
    return command[command.index("--master_port") + 1]


def shm_buffers(port: str) -> list[Path]:
    """This launch's buffers (other launches on the machine have their own ports)."""
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def logged_at(line: str) -> float:
    stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line).group(1)
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.parametrize("fault", ["metrics_unwritable", "checkpoint_enospc", "worker_error"])
def test_an_error_on_rank_0_ends_every_rank_and_the_launcher(shards, tmp_path, fault):
    """Tried: rank 0 alone fails — metrics.jsonl is a directory (setup), torch.save raises ENOSPC under
    checkpoints/ (the first checkpoint, at update 3), a DataLoader worker of rank 0 raises (data). Survives:
    the launcher exits non-zero within 60 s of the error, the error is named once with its rank, and no
    process of the launch (rank, launcher, DataLoader worker) is left."""
    output = tmp_path / "run"
    if fault == "metrics_unwritable":
        (output / "metrics.jsonl").mkdir(parents=True)
    process = start(raw_launch(shards, output, "train.checkpoint_interval=3"), tmp_path, SSLAM_FAULT=fault)
    out = finish(process, timeout=300)
    ended = time.time()
    assert process.returncode != 0, out[-4000:]
    failures = [line for line in out.splitlines() if "rank 0 failed:" in line]
    assert len(failures) == 1, out[-4000:]
    expected = {"metrics_unwritable": "IsADirectoryError", "checkpoint_enospc": "No space left on device",
                "worker_error": "injected worker fault"}[fault]
    assert expected in failures[0], failures
    assert "rank 1 failed" not in out, out[-4000:]
    assert ended - logged_at(failures[0]) < ENDS_WITHIN_S, failures[0]


def test_sigterm_to_a_rank_of_the_raw_launcher_checkpoints_every_rank(shards, tmp_path):
    """Tried: SIGTERM to local rank 1 only, under the plain `deepspeed` launcher. Survives: both ranks stop at
    the same update boundary with one checkpoint; the launcher exits 0; every consumed micro-batch belongs to a
    logged update; no process is left."""
    output = tmp_path / "run"
    process = start(raw_launch(shards, output), tmp_path)
    wait_for_micro_batches(process, output, 4)
    rank1 = next(p for p in session(process.pid) if "--local_rank=1" in " ".join(p.cmdline()))
    rank1.send_signal(signal.SIGTERM)
    out = finish(process, timeout=180)
    assert process.returncode == 0, out[-4000:]
    tag = checkpointing.latest_tag(checkpointing.checkpoint_root(output))
    update = int(tag.split("_")[1])
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in metrics] == list(range(1, update + 1))
    assert consumed(output, 0) == consumed(output, 1) == 2 * update


def test_sigterm_to_sslam_pretrain_checkpoints_and_a_second_job_is_refused(shards, tmp_path):
    """Tried: `sslam pretrain --ranks 2` with a stale op-build lock planted in its TORCH_EXTENSIONS_DIR; while
    it trains, a second `sslam pretrain` on the same train.output_dir; then SIGTERM to the first CLI.
    Survives: the stale lock is removed with a warning; the second job exits 2 naming the holder (host, pid,
    start time) before launching anything; the first writes one preemption checkpoint on every rank, exits 0,
    leaves no process and no /dev/shm buffer; the run lock records "preempted"."""
    extensions = tmp_path / "extensions"
    built = next(Path.home().glob(".cache/torch_extensions/*/deepspeed_shm_comm"), None)
    op_dir = extensions / "py311_cpu" / "deepspeed_shm_comm"
    if built is not None:
        shutil.copytree(built, op_dir)
    op_dir.mkdir(parents=True, exist_ok=True)
    (op_dir / "lock").touch()
    output = tmp_path / "run"
    process = start(cli_launch(shards, output), tmp_path, TORCH_EXTENSIONS_DIR=str(extensions))
    wait_for_micro_batches(process, output, 4)
    port = launch_port(process)
    assert shm_buffers(port)  # the ranks have theirs

    second = subprocess.run(cli_launch(shards, output), cwd=tmp_path, env=env(), capture_output=True, text=True,
                            timeout=120)
    holder = run_lock.read_holder(output)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"host {holder['host']} pid {holder['pid']} started {holder['started']}" in second.stderr
    assert holder["state"] == "running"

    process.send_signal(signal.SIGTERM)
    out = finish(process, timeout=180)
    assert process.returncode == 0, out[-4000:]
    assert "removing the stale op-build lock" in out and not (op_dir / "lock").exists()
    tag = checkpointing.latest_tag(checkpointing.checkpoint_root(output))
    update = int(tag.split("_")[1])
    assert len(list((output / "checkpoints" / tag).glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    assert consumed(output, 0) == consumed(output, 1) == 2 * update
    assert run_lock.read_holder(output)["state"] == "preempted"
    assert shm_buffers(port) == []


def test_a_killed_launcher_under_sslam_pretrain_still_checkpoints_and_a_second_signal_kills(shards, tmp_path):
    """Tried: SIGTERM to the `deepspeed` runner under `sslam pretrain --ranks 2` (the ranks would be orphans);
    then, in a second run, SIGINT twice to the CLI. Survives: the CLI stops the orphaned ranks with a checkpoint
    and exits 0; after two SIGINTs it exits 130 at once, killing every process of the job, /dev/shm clean."""
    output = tmp_path / "run"
    process = start(cli_launch(shards, output), tmp_path)
    wait_for_micro_batches(process, output, 4)
    runner = psutil.Process(process.pid).children()[0]
    runner.send_signal(signal.SIGTERM)
    out = finish(process, timeout=180)
    assert process.returncode == 0, out[-4000:]
    assert "the launcher ended" in out
    assert checkpointing.latest_tag(checkpointing.checkpoint_root(output)) is not None
    assert run_lock.read_holder(output)["state"] == "preempted"

    output = tmp_path / "again"
    process = start(cli_launch(shards, output), tmp_path)
    wait_for_micro_batches(process, output, 4)
    port = launch_port(process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    began = time.monotonic()
    out = finish(process, timeout=60)
    assert time.monotonic() - began < 20
    assert process.returncode == 130, out[-4000:]
    assert shm_buffers(port) == []
