"""Checkpoints of a pre-training run under ZeRO-2 (one CPU launch shared by the tests here).

Several param groups: DeepSpeed links parameters to their Adam state after the first group's step only, and
`checkpointing.full_moments` then failed ("exp_avg not found in optimizer state fragment") for the later groups;
`checkpointing.relink_optimizer_states` fixes that (pre-training with `weight_decay_mode=exclude_norm_bias`,
fine-tuning's layer-decay groups). Once per checkpoint: the teacher is in `teacher.safetensors` only (it is kept
outside the engine's module, so DeepSpeed's model states never hold it) and the config in `config.yaml` only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.train import checkpointing
from shardsets import write_training_set
from test_pretrain_launch import cpu_env


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The update-3 checkpoint of a 3-update pre-training run with two weight-decay groups."""
    tmp_path = tmp_path_factory.mktemp("groups")
    write_training_set(tmp_path / "shards", 512, 64)
    command = [sys.executable, "-m", "jobs.cli", "pretrain", "--config", "tiny_stage1",
               "--set", "data.loader.shards=shards", "--set", "data.loader.num_workers=0",
               "--set", "train.max_updates=3", "--set", "train.checkpoint_interval=3",
               "--set", "train.weight_decay_mode=exclude_norm_bias", "--set", "tracking.enabled=false",
               "--set", "train.output_dir=runs/groups"]
    result = subprocess.run(command, cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return checkpointing.checkpoint_root(tmp_path / "runs" / "groups") / "update_00000003"


def test_pretraining_with_two_weight_decay_groups_writes_every_moment(folder):
    moments = load_file(str(folder / checkpointing.OPTIMIZER_FILE))
    student = load_file(str(folder / checkpointing.STUDENT_FILE))
    trained = [name for name in student if name != "encoder.pos_embed" and not name.startswith("teacher")]
    # both groups' tensors (decayed weights and exempt biases / norms) carry both moments
    assert any(name.endswith(".bias") for name in trained)
    assert {f"exp_avg.{name}" for name in trained} <= set(moments)
    assert {f"exp_avg_sq.{name}" for name in trained} <= set(moments)


def _names(value, prefix: str = "") -> list[str]:
    """Every key path in a nested checkpoint state."""
    if isinstance(value, dict):
        return [name for key, item in value.items() for name in [f"{prefix}{key}", *_names(item, f"{prefix}{key}.")]]
    if isinstance(value, (list, tuple)):
        return [name for index, item in enumerate(value) for name in _names(item, f"{prefix}{index}.")]
    return []


def test_teacher_and_config_are_written_once_per_checkpoint(folder):
    assert checkpointing.verify(folder, rehash=True) is None
    teacher = load_file(str(folder / checkpointing.TEACHER_FILE))
    student = load_file(str(folder / checkpointing.STUDENT_FILE))
    assert teacher and not any(name.startswith("teacher") for name in student)
    modules = []
    for path in sorted(folder.glob("*.pt")):  # our own run's files: trusted
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert not [name for name in _names(state) if "teacher" in name], path.name
        if state.get("module"):
            modules.append(set(state["module"]))
    assert modules and all(any(name.startswith("encoder.") for name in m) and m <= set(student) for m in modules)
    configs = [path.name for path in folder.iterdir() if path.suffix in (".yaml", ".yml")]
    assert configs == [checkpointing.CONFIG_FILE]
