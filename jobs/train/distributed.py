"""The process group of a training rank: joining it (`start_rank`: this rank's device, DeepSpeed's process
group with the configured collective timeout) and the MAX reductions every rank agrees through (`rank_max` of a
flag vector, `any_rank` of one flag); both reductions are no-ops when the job is not distributed."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from jobs.train.config import Config


def start_rank(config: Config) -> torch.device:
    """This rank's device (`cuda:LOCAL_RANK` when there is a GPU, else the CPU), made current, and the process
    group joined (NCCL on GPUs, gloo on CPUs) with `train.collective_timeout_s`."""
    import deepspeed

    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=config.train.collective_timeout_s),
    )
    return device


def rank_max(values: torch.Tensor) -> torch.Tensor:
    """`values` replaced, in place, by their element-wise maximum over the ranks (one all-reduce)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is true on any rank (a MAX all-reduce of one value on `device`)."""
    return bool(rank_max(torch.tensor([float(flag)], device=device)).item())
