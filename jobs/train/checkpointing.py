"""Checkpoints of the pre-training job: writing, completeness, choosing one to resume, elastic restore.

A checkpoint is a tag folder `update_{u:08d}` under `train.output_dir/checkpoints`, written by every rank:
DeepSpeed's files (model states, one optimizer shard per rank) and, from rank 0, the resolved config
(`config.yaml`), the student's full fp32 weights gathered from the master copies (`student.safetensors`),
the teacher (`teacher.safetensors`), the student's full Adam moments (`optimizer.safetensors`) and
`run_state.json` (update count, epoch, every rank's loader position and RNG states, the LR schedule, the
optimizer step, the dataset fingerprint, the rank count and ZeRO stage that wrote it).

Completeness. Every file is hashed while it is written (DeepSpeed's checkpoint engine writes through a
hashing stream), and rank 0 writes `manifest.json` last and atomically: each file with its size and
sha256. A folder without a manifest, or whose files are missing or of another size (or, with
`rehash=True`, another sha256), is partial and never resumed. `latest_complete` picks the newest
complete tag and reports each newer one it skipped and why (DeepSpeed's `latest` file is not trusted).

Elastic restore. Same rank count and ZeRO stage: DeepSpeed's own `load_checkpoint`. Otherwise the engine
is built from `student.safetensors`, then `restore_optimizer` creates the Adam state, writes each
parameter's full moments with DeepSpeed's `safe_set_full_optimizer_state` (each rank keeps its
partition), and restores the step, the learning rates and the engine's counters. Stage-2 initialisation
reads only the safetensors files, never a pickle, so a stage-1 folder from elsewhere cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from pipeline.atomic import write_text

log = logging.getLogger("sslam.checkpoint")

TAG_PATTERN = re.compile(r"^update_(\d{8})$")
STUDENT_FILE = "student.safetensors"
TEACHER_FILE = "teacher.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.yaml"
RUN_STATE_FILE = "run_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
MOMENTS = ("exp_avg", "exp_avg_sq")


def tag_for(updates: int) -> str:
    return f"update_{updates:08d}"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))


# ---- writing -----------------------------------------------------------------------------------------


class HashingWriter:
    """A binary file being written, hashed on the way (sha256 and size): no second read of what was saved.
    It has no `fileno`, so torch.save writes storages through `write` too."""

    def __init__(self, path: Path):
        self.name = str(path)
        self._file = open(path, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += len(view)
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> dict:
        """Flush to disk and close; returns the file's manifest record. The file is written under its final name
        (DeepSpeed names it) and synced here through the open handle: the manifest, published atomically after
        every file is closed, is the checkpoint's commit."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"size": self.size, "sha256": self._hash.hexdigest()}


def write_hashed(path: Path, data: bytes) -> dict:
    writer = HashingWriter(path)
    writer.write(data)
    return writer.close()


class RecordingCheckpointEngine:
    """Wraps DeepSpeed's torch checkpoint engine: `save` writes through a `HashingWriter` and records each
    file's size and sha256 (by file name) in `records`; everything else is DeepSpeed's."""

    def __init__(self, inner):
        self.inner = inner
        self.records: dict[str, dict] = {}

    def save(self, state_dict, path: str) -> None:
        writer = HashingWriter(Path(path))
        try:
            zipfile = getattr(self.inner, "zipfile_serialization", True)
            torch.save(state_dict, writer, _use_new_zipfile_serialization=zipfile)
        finally:
            self.records[Path(path).name] = writer.close()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _recorder(engine) -> RecordingCheckpointEngine:
    if not isinstance(engine.checkpoint_engine, RecordingCheckpointEngine):
        engine.checkpoint_engine = RecordingCheckpointEngine(engine.checkpoint_engine)
    return engine.checkpoint_engine


def write_manifest(folder: Path, records: dict[str, dict]) -> None:
    """The commit of a checkpoint: published atomically and durably (pipeline.atomic)."""
    manifest = {"version": MANIFEST_VERSION, "files": dict(sorted(records.items()))}
    write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=1))


def manifest_for_files(folder: Path) -> None:
    """A manifest for the files already in `folder` (hashing them): folders written by other tools or tests."""
    records = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_FILE:
            records[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    write_manifest(folder, records)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_states() -> dict:
    """This process's RNG states as JSON values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
        "python": [version, list(state), python_gauss],
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, state, python_gauss = states["python"]
    random.setstate((version, tuple(state), python_gauss))


def gather_from_ranks(value):
    """Every rank's `value` as a list indexed by rank (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _has_master(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def full_fp32_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's full fp32 weights from DeepSpeed's master copies (under ZeRO a collective: all ranks call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param) if _has_master(param) else None
        state[name] = (param.detach() if full is None else full).float().cpu().contiguous()
    for name, buffer in module.named_buffers():
        state[name] = buffer.detach().float().cpu().contiguous()
    return state


def _base_optimizer(engine) -> torch.optim.Optimizer:
    optimizer = engine.optimizer
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


def relink_optimizer_states(engine) -> None:
    """DeepSpeed's ZeRO-1/2 optimizer steps its param groups one at a time and links each parameter to its Adam
    state right after the FIRST group's step, so the moments of the later groups (fine-tuning's layer-decay groups, pre-training's exclude_norm_bias groups) stay
    unreachable for `full_moments`. Link them again once every group has its state."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked") and hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def full_moments(engine) -> dict[str, torch.Tensor]:
    """`{moment}.{parameter}` full fp32 Adam moments of every trained parameter (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _base_optimizer(engine)
    state = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        for key in MOMENTS:
            if _has_master(param):
                value = safe_get_full_optimizer_state(param, key)
            else:  # ZeRO stage 0: the torch optimizer holds the module's own parameters
                value = base.state.get(param, {}).get(key)
            if value is not None:
                state[f"{key}.{name}"] = value.detach().float().cpu().contiguous()
    return state


def optimizer_scalars(engine, scheduler) -> dict:
    """What besides the moments continues an optimizer: Adam's step, each group's lr, the LR schedule,
    the engine's counters and (fp16) the loss scaler."""
    base = _base_optimizer(engine)
    steps = [float(s["step"]) for s in base.state.values() if "step" in s]
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return {
        "adam_step": steps[0] if steps else 0.0,
        "group_lrs": [group["lr"] for group in engine.optimizer.param_groups],
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "loss_scale": {k: getattr(scaler, k) for k in ("cur_scale", "cur_iter", "last_overflow_iter")
                       if hasattr(scaler, k)},
    }


def save(engine, root: Path, updates: int, run_state: dict, teacher: torch.nn.Module | None, config_yaml: str,
         keep: int, scheduler) -> str:
    """All ranks call this. Every file is hashed as it is written; rank 0 commits the manifest last, then
    prunes `root` to its newest `keep` complete tags. Without a teacher (fine-tuning) no teacher file is written."""
    tag = tag_for(updates)
    folder = root / tag
    if engine.global_rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST_FILE).unlink(missing_ok=True)  # a folder being rewritten is partial until committed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    recorder = _recorder(engine)
    recorder.records = {}
    engine.save_checkpoint(str(root), tag=tag, client_state={})
    student = full_fp32_state(engine.module)
    moments = full_moments(engine)
    records = gather_from_ranks(recorder.records)
    run_state = {**run_state, "optimizer": optimizer_scalars(engine, scheduler)}
    if engine.global_rank == 0:
        files = {name: record for rank_records in records for name, record in rank_records.items()}
        files[CONFIG_FILE] = write_hashed(folder / CONFIG_FILE, config_yaml.encode())
        files[STUDENT_FILE] = write_hashed(folder / STUDENT_FILE, safetensors_bytes(student))
        if teacher is not None:
            teacher_state = {k: v.detach().float().cpu().contiguous() for k, v in teacher.state_dict().items()}
            files[TEACHER_FILE] = write_hashed(folder / TEACHER_FILE, safetensors_bytes(teacher_state))
        files[OPTIMIZER_FILE] = write_hashed(folder / OPTIMIZER_FILE, safetensors_bytes(moments))
        files[RUN_STATE_FILE] = write_hashed(folder / RUN_STATE_FILE, json.dumps(run_state).encode())
        write_manifest(folder, files)
        if keep > 0:
            prune(root, keep)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    log.info("checkpoint %s written to %s", tag, root)
    return tag


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete tags; remove older complete tags and partial folders older than them."""
    tags = list_tags(root)
    complete = [tag for tag in tags if verify(root / tag) is None]
    if len(complete) < keep:
        return
    oldest_kept = complete[-keep]
    for tag in tags:
        if tag < oldest_kept:
            shutil.rmtree(root / tag, ignore_errors=True)


# ---- completeness and choice -------------------------------------------------------------------------


def verify(folder: Path, rehash: bool = False) -> str | None:
    """None when the folder's manifest verifies (every file present with its size; with `rehash`, its
    sha256 too), else what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (its writing did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST_FILE} is unreadable ({error})"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record["size"]:
            return f"{name} has {size} bytes, the manifest says {record['size']}"
        if rehash and sha256_file(path) != record["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


@dataclass
class Choice:
    """The checkpoint to continue from (None: none complete) and the newer ones skipped, with the reason."""

    folder: Path | None
    skipped: list[tuple[str, str]]


def latest_complete(root: Path, rehash: bool = False) -> Choice:
    skipped: list[tuple[str, str]] = []
    tags = list_tags(root)
    latest = root / "latest"
    if latest.is_file():
        named = latest.read_text().strip()
        if named not in tags:
            skipped.append((named, f"named by {latest} but there is no such folder"))
    for tag in reversed(tags):
        problem = verify(root / tag, rehash)
        if problem is None:
            return Choice(root / tag, skipped)
        skipped.append((tag, problem))
    return Choice(None, skipped)


def latest_tag(root: Path) -> str | None:
    """The newest complete tag under `root`, or None."""
    choice = latest_complete(root)
    return choice.folder.name if choice.folder is not None else None


def read_run_state(folder: Path) -> dict:
    return json.loads((folder / RUN_STATE_FILE).read_text())


# ---- restoring ---------------------------------------------------------------------------------------


def restore_optimizer(engine, scheduler, folder: Path, scalars: dict) -> None:
    """After `deepspeed.initialize` on a model that holds the checkpoint's fp32 weights: the fp32 masters
    (DeepSpeed built them from the module's bf16/fp16 copies), the Adam moments (each rank keeps its
    partition), the step, the learning rates, the schedule and the engine's counters."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    moments = load_file(str(folder / OPTIMIZER_FILE))
    weights = load_file(str(folder / STUDENT_FILE))
    base = _base_optimizer(engine)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 keeps them outside the groups
    params = flats if flats else [p for group in base.param_groups for p in group["params"]]
    step = torch.tensor(float(scalars["adam_step"]))
    for param in params:
        base.state[param] = {"step": step.clone(), **{key: torch.zeros_like(param) for key in MOMENTS}}
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    missing = []
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        if _has_master(param):  # under bf16/fp16 DeepSpeed built the masters from the rounded module weights
            safe_set_full_fp32_param(param, weights[name].to(param.device))
        for key in MOMENTS:
            value = moments.get(f"{key}.{name}")
            if value is None:
                missing.append(f"{key}.{name}")
            elif _has_master(param):
                safe_set_full_optimizer_state(param, value.to(param.device), key)
            else:
                base.state[param][key].copy_(value)
    if missing:
        raise ValueError(f"{folder / OPTIMIZER_FILE} lacks {len(missing)} moments, e.g. {missing[:3]}")
    scheduler.load_state_dict({**scheduler.state_dict(), **scalars["scheduler"]})
    for group, lr in zip(engine.optimizer.param_groups, scalars["group_lrs"]):
        group["lr"] = lr
    engine.global_steps = scalars["global_steps"]
    engine.global_samples = scalars["global_samples"]
    engine.skipped_steps = scalars["skipped_steps"]
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in scalars.get("loss_scale", {}).items():
        if scaler is not None and hasattr(scaler, key):
            setattr(scaler, key, value)


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
