"""A training rank dies: SIGKILL of rank 1 (not the launcher) of a 2-rank `deepspeed` CPU run, then `--resume`.

The whole job must end non-zero well before the 300 s collective timeout, leave no rank process behind, and a
`--resume` run must restore the last complete checkpoint and continue its metrics from that update. (A SIGKILL
of the whole launcher process group and exact replay are in tests/test_pretrain_launch.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from jobs.train import checkpointing
from reliability_support import BIN, PRETRAIN, cpu_env, free_port, run_command
from shardsets import write_training_set

pytestmark = pytest.mark.slow

T, F = 128, 32
INTERVAL = 5
EXIT_WITHIN_S = 60


def _command(shards: Path, output: Path, *overrides: str, resume: bool = False) -> list[str]:
    settings = [f"data.loader.shards={shards}", f"train.output_dir={output}", "data.loader.num_workers=0",
                "tracking.enabled=false", f"train.checkpoint_interval={INTERVAL}", "train.keep_checkpoints=10",
                f"data.audio.target_length={T}", f"data.audio.mel_bins={F}", f"model.target_length={T}",
                f"model.mel_bins={F}", *overrides]
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), PRETRAIN,
            "--config", "tiny_stage1", *[f"--set={s}" for s in settings]] + (["--resume"] if resume else [])


def _updates(output: Path) -> list[int]:
    return [json.loads(line)["update"] for line in (output / "metrics.jsonl").read_text().splitlines() if line]


def _rank_process(launcher: psutil.Process, local_rank: int) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if f"--local_rank={local_rank}" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def test_a_killed_rank_ends_the_job_quickly_and_resume_continues(tmp_path):
    """Tried: SIGKILL of local rank 1 after the first checkpoint is complete, then the same command with
    `--resume` and max_updates = that checkpoint + 2 intervals. Survives: the launcher exits non-zero within
    60 s of the kill (not the 300 s collective timeout) and no rank process is left; the resumed run logs
    "resumed from" the newest complete checkpoint, and its metrics continue from that update to the end."""
    shards = tmp_path / "shards"
    write_training_set(shards, target_length=T, mel_bins=F, num_shards=2, groups_per_shard=8)
    output = tmp_path / "run"
    launcher = subprocess.Popen(_command(shards, output, "train.max_updates=100000"), cwd=tmp_path, env=cpu_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        root = checkpointing.checkpoint_root(output)
        first = root / checkpointing.tag_for(INTERVAL) / checkpointing.MANIFEST_FILE  # written last
        deadline = time.monotonic() + 240
        while not first.exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
        tree = psutil.Process(launcher.pid).children(recursive=True)
        victim = _rank_process(psutil.Process(launcher.pid), local_rank=1)
        assert victim is not None, [p.cmdline() for p in tree]
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = launcher.wait(timeout=EXIT_WITHIN_S + 30)
        took = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert code != 0
    assert took < EXIT_WITHIN_S, f"the job needed {took:.0f} s to end after the kill"
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, [p.cmdline() for p in alive]

    restored = checkpointing.latest_tag(root)
    restored_update = int(restored.split("_")[1])
    assert restored_update >= INTERVAL and (root / restored / "teacher.safetensors").exists()
    logged_before = len(_updates(output))
    final = restored_update + 2 * INTERVAL
    result = run_command(_command(shards, output, f"train.max_updates={final}", resume=True), cwd=tmp_path,
                         timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {restored} at update {restored_update}" in result.stdout + result.stderr
    assert _updates(output)[logged_before:] == list(range(restored_update + 1, final + 1))
    assert checkpointing.latest_tag(root) == checkpointing.tag_for(final)
