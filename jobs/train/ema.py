"""Teacher EMA from DeepSpeed's fp32 master weights, correct under ZeRO stages 0-3.

Each rank holds the fp32 master copy of only part of the student (its optimizer partition). It updates
the teacher elements whose master copy it owns, writes them into one flat contribution buffer (zeros
elsewhere), and a single all-reduce assembles the full new teacher on every rank: one collective per
update instead of one gather per parameter (DESIGN.md, "Known pitfalls": DeepSpeed).

Without partitioning (a plain module, or one rank) the update runs locally from the parameters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _master_fragments(param: nn.Parameter, rank: int) -> list[tuple[int, torch.Tensor]] | None:
    """(start in the flattened parameter, fp32 values) owned by this rank; None when not partitioned."""
    if hasattr(param, "ds_id"):  # ZeRO-3: rank r owns [r * partition, (r + 1) * partition), padded at the end
        from deepspeed.utils import safe_get_local_fp32_param

        partition = param.ds_tensor.ds_numel
        start = rank * partition
        count = max(0, min(partition, param.ds_numel - start))
        local = safe_get_local_fp32_param(param)
        return [(start, local.flatten()[:count])] if count else []
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimizer: a fragment, or None when not ours
        mapping = param._hp_mapping
        if mapping is None:
            return []
        address = mapping.lp_fragment_address
        return [(address.start, mapping.get_hp_fragment().flatten())]
    return None


def _no_master_copy(name: str, param: nn.Parameter) -> RuntimeError:
    return RuntimeError(
        f"no fp32 master copy of '{name}' ({param.dtype}): the teacher EMA would average low-precision weights"
    )


class MasterWeightEMA:
    """θ_T <- d·θ_T + (1 - d)·θ_S over the student encoder's trainable tensors (SSLAM_SPEC §6, §14.4)."""

    def __init__(self, student_encoder: nn.Module, teacher: nn.Module, group=None):
        self.group = group
        teacher_params = dict(teacher.named_parameters())
        self.pairs: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        for name, param in student_encoder.named_parameters():
            if not param.requires_grad:
                continue
            if name not in teacher_params:
                raise KeyError(f"teacher has no parameter '{name}' to track")
            self.pairs.append((name, param, teacher_params[name]))
        self.offsets = []
        total = 0
        for _, _, target in self.pairs:
            self.offsets.append(total)
            total += target.numel()
        self.total = total

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    @torch.no_grad()
    def update(self, decay: float) -> None:
        rank = dist.get_rank(self.group) if self._distributed() else 0
        fragments = [_master_fragments(param, rank) for _, param, _ in self.pairs]
        if all(f is None for f in fragments) or not self._distributed():
            self._update_local(decay, fragments)
            return
        device = self.pairs[0][2].device
        contribution = torch.zeros(self.total, dtype=torch.float32, device=device)
        for (name, param, target), offset, owned in zip(self.pairs, self.offsets, fragments):
            if owned is None:  # a parameter DeepSpeed does not partition: rank 0 contributes it whole
                if param.dtype != torch.float32:
                    raise _no_master_copy(name, param)
                owned = [(0, param.detach().flatten())] if rank == 0 else []
            flat_target = target.detach().flatten()
            for start, values in owned:
                count = values.numel()
                current = flat_target[start : start + count].float()
                new = current.mul(decay).add_(values.to(device), alpha=1.0 - decay)
                contribution[offset + start : offset + start + count] = new
        dist.all_reduce(contribution, group=self.group)
        for (_, _, target), offset in zip(self.pairs, self.offsets):
            target.copy_(contribution[offset : offset + target.numel()].view_as(target))

    def _update_local(self, decay: float, fragments) -> None:
        for (name, param, target), owned in zip(self.pairs, fragments):
            if owned:  # a single rank owns the whole partitioned parameter
                source = torch.zeros(target.numel(), dtype=torch.float32, device=target.device)
                for start, values in owned:
                    source[start : start + values.numel()] = values.to(target.device)
                source = source.view_as(target)
            elif param.dtype == torch.float32:
                source = param.detach()
            else:
                raise _no_master_copy(name, param)
            target.mul_(decay).add_(source.to(target.device), alpha=1.0 - decay)
