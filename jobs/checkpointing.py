"""Checkpoints of the pre-training job: DeepSpeed save/resume, keep-last-M, and stage-2 initialisation.

A checkpoint is a DeepSpeed tag folder `update_{u:08d}` under `train.output_dir/checkpoints`, written by
every rank. Beside DeepSpeed's files, rank 0 writes the resolved config (`config.yaml`), the student's full
fp32 weights (`student.safetensors`, gathered from the master copies) and the teacher (`teacher.safetensors`).
`client_state` holds the update count, epoch, every rank's loader position and RNG states, the teacher and
the dataset fingerprint. Stage-2 initialisation reads only the two safetensors files, never a pickle, so a
stage-1 folder from elsewhere cannot run code; resuming a run's own checkpoints goes through DeepSpeed.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

log = logging.getLogger("sslam.checkpoint")

TAG_PATTERN = re.compile(r"^update_(\d{8})$")
STUDENT_FILE = "student.safetensors"
TEACHER_FILE = "teacher.safetensors"


def tag_for(updates: int) -> str:
    return f"update_{updates:08d}"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))


def latest_tag(root: Path) -> str | None:
    """The tag named by DeepSpeed's `latest` file when its folder exists, else the newest complete tag."""
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag).is_dir():
            return tag
    tags = list_tags(root)
    return tags[-1] if tags else None


def rng_states() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def gather_from_ranks(value):
    """Every rank's `value` as a list indexed by rank (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def full_fp32_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's full fp32 weights from DeepSpeed's master copies (under ZeRO a collective: all ranks call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param) if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping") else None
        state[name] = (param.detach() if full is None else full).float().cpu().contiguous()
    for name, buffer in module.named_buffers():
        state[name] = buffer.detach().float().cpu().contiguous()
    return state


def save(engine, root: Path, updates: int, client_state: dict, teacher: torch.nn.Module, config_yaml: str, keep: int):
    """All ranks call this. Rank 0 adds config, student and teacher files, then prunes to the newest `keep` tags."""
    tag = tag_for(updates)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    student = full_fp32_state(engine.module)
    if engine.global_rank == 0:
        folder = root / tag
        (folder / "config.yaml").write_text(config_yaml)
        save_file(student, str(folder / STUDENT_FILE))
        teacher_state = {k: v.detach().float().cpu().contiguous() for k, v in teacher.state_dict().items()}
        save_file(teacher_state, str(folder / TEACHER_FILE))
        for old in list_tags(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(root / old, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    log.info("checkpoint %s written to %s", tag, root)
    return tag


def load_initialisation(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(student, teacher) fp32 weights of a checkpoint folder, from safetensors only."""
    missing = [name for name in (STUDENT_FILE, TEACHER_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {' and '.join(missing)} (written beside every checkpoint)")
    return load_file(str(folder / STUDENT_FILE)), load_file(str(folder / TEACHER_FILE))


def consolidated_student(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The student's fp32 weights from a ZeRO checkpoint, via DeepSpeed's own consolidation utility."""
    folder = root / tag
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:  # ZeRO stage 0: the model-states file holds the full module
        states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = states["module"]
    return {k: v.float() for k, v in state.items()}
