"""`train.compile: true`: the job compiles the student's blocks and decoder and the teacher's blocks
(SSLAM.compile_blocks) and trains to the same losses as eager, with the same parameter names in its checkpoint.

One test: compiling on the CPU takes tens of seconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.train import checkpointing
from shardsets import write_training_set

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "jobs" / "pretrain.py")
TRACED = "torchdynamo start tracing forward"


def _run(shards: Path, output: Path, compile_: bool) -> subprocess.CompletedProcess:
    """One rank as the launcher starts it; TORCH_LOGS=dynamo names every frame Dynamo traces."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCH_LOGS="dynamo",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    # Stage 2 from scratch: both teacher passes (clips + mixtures, then partners without the no-mix rows).
    overrides = [f"data.loader.shards={shards}", f"train.output_dir={output}", "data.loader.num_workers=0",
                 "tracking.enabled=false", "train.init_from=", "train.max_updates=3", f"train.compile={compile_}"]
    command = [sys.executable, PRETRAIN, "--config", "tiny_stage2", *[f"--set={o}" for o in overrides]]
    return subprocess.run(command, cwd=output.parent, env=env, capture_output=True, text=True, timeout=600)


def _losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]


def _final(output: Path, name: str) -> dict[str, torch.Tensor]:
    root = checkpointing.checkpoint_root(output)
    return load_file(str(root / checkpointing.latest_tag(root) / name))


def test_compiled_training_matches_eager(tmp_path):
    shards = tmp_path / "shards"
    write_training_set(shards, target_length=512, mel_bins=64, num_shards=1, groups_per_shard=4)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    eager_run = _run(shards, eager, compile_=False)
    assert eager_run.returncode == 0, eager_run.stderr[-4000:]
    compiled_run = _run(shards, compiled, compile_=True)
    assert compiled_run.returncode == 0, compiled_run.stderr[-4000:]

    # Dynamo traced the transformer block and the decoder only when asked to.
    assert f"{TRACED} {REPO / 'model' / 'encoder.py'}" in compiled_run.stderr
    assert f"{TRACED} {REPO / 'model' / 'decoder.py'}" in compiled_run.stderr
    assert TRACED not in eager_run.stderr

    assert len(_losses(eager)) == len(_losses(compiled)) == 3
    torch.testing.assert_close(torch.tensor(_losses(compiled)), torch.tensor(_losses(eager)), rtol=1e-4, atol=0)
    for name in ("student.safetensors", "teacher.safetensors"):
        want, got = _final(eager, name), _final(compiled, name)
        assert sorted(got) == sorted(want), name  # compiling in place keeps the parameter names
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{name}:{key}")
