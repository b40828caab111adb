"""Which checkpoint a training job continues from (`train.resume`) or starts from (`train.init_from`): rank 0
reads the checkpoint folders once and broadcasts its answer (or its ConfigError) to every rank; partial
checkpoints are skipped with a warning naming each one."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from jobs.train import checkpointing
from jobs.train.config import Config, ConfigError

log = logging.getLogger("sslam.train")


def on_rank0(rank: int, world_size: int, decide):
    """Rank 0 decides (reading the checkpoint folders once), every rank gets its answer or its ConfigError."""
    answer = [None]
    if rank == 0:
        try:
            answer = [("ok", decide())]
        except (ConfigError, OSError) as error:  # the other ranks are waiting in the broadcast
            answer = [("error", str(error))]
    if dist.is_initialized() and world_size > 1:
        dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def newest_complete(root: Path, key: str, rehash: bool, missing_ok: bool = False) -> Path | None:
    """The newest complete checkpoint under `root`, each newer partial one reported; ConfigError (naming `key`)
    when there is none, unless `missing_ok`."""
    choice = checkpointing.latest_complete(root, rehash)
    for tag, reason in choice.skipped:
        log.warning("%s: skipping checkpoint %s: %s", key, root / tag, reason)
    if choice.folder is None and not missing_ok:
        reasons = "; ".join(f"{tag}: {reason}" for tag, reason in choice.skipped)
        raise ConfigError(f"{key}: no checkpoint under {root}" + (f" is complete ({reasons})" if reasons else ""))
    if choice.folder is not None and choice.skipped:
        log.warning("%s: continuing from the newest complete checkpoint %s", key, choice.folder)
    return choice.folder


def resume_folder(config: Config, root: Path, rank: int, world_size: int) -> Path | None:
    """The checkpoint folder to continue from: train.resume=auto takes this run's newest complete one under
    `root`, a path names a tag folder (which must be complete) or a run / checkpoints folder (its newest
    complete)."""
    resume, rehash = config.train.resume, config.train.verify_checkpoint_checksums
    if resume == "never":
        return None
    if resume == "auto":
        return on_rank0(rank, world_size, lambda: newest_complete(root, "train.resume", rehash, missing_ok=True))
    path = Path(resume)
    if checkpointing.TAG_PATTERN.match(path.name) and path.is_dir():
        problem = on_rank0(rank, world_size, lambda: checkpointing.verify(path, rehash))
        if problem is not None:
            raise ConfigError(f"train.resume={resume}: the checkpoint is not complete ({problem})")
        return path
    if path.is_dir():
        tags = checkpointing.checkpoint_root(path) if (path / "checkpoints").is_dir() else path
        return on_rank0(rank, world_size, lambda: newest_complete(tags, "train.resume", rehash))
    raise ConfigError(f"train.resume: no checkpoint folder {resume}")
