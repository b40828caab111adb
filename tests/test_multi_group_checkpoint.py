"""Checkpoints of an optimizer with several param groups under ZeRO-2: DeepSpeed links parameters to their Adam state
after the first group's step only, and `checkpointing.full_moments` then failed ("exp_avg not found in optimizer
state fragment") for the later groups; `checkpointing.relink_optimizer_states` fixes that (pre-training with
`weight_decay_mode=exclude_norm_bias`, fine-tuning's layer-decay groups)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from jobs.train import checkpointing
from shardsets import write_training_set
from test_pretrain_launch import cpu_env


def test_pretraining_with_two_weight_decay_groups_writes_every_moment(tmp_path):
    write_training_set(tmp_path / "shards", 512, 64)
    command = [sys.executable, "-m", "jobs.cli", "pretrain", "--config", "tiny_stage1",
               "--set", "data.loader.shards=shards", "--set", "data.loader.num_workers=0",
               "--set", "train.max_updates=3", "--set", "train.checkpoint_interval=3",
               "--set", "train.weight_decay_mode=exclude_norm_bias", "--set", "tracking.enabled=false",
               "--set", "train.output_dir=runs/groups"]
    result = subprocess.run(command, cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = checkpointing.checkpoint_root(tmp_path / "runs" / "groups") / "update_00000003"
    moments = load_file(str(Path(folder) / checkpointing.OPTIMIZER_FILE))
    student = load_file(str(Path(folder) / checkpointing.STUDENT_FILE))
    trained = [name for name in student if name != "encoder.pos_embed" and not name.startswith("teacher")]
    # both groups' tensors (decayed weights and exempt biases / norms) carry both moments
    assert any(name.endswith(".bias") for name in trained)
    assert {f"exp_avg.{name}" for name in trained} <= set(moments)
    assert {f"exp_avg_sq.{name}" for name in trained} <= set(moments)
