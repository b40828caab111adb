"""The `model.utterance_center` step on CLS targets (b, D) float32, and the state it keeps.

- "none" (the reference's): the targets as they are.
- "batch": minus their mean across the b rows per dimension (model/targets.py, center_utterance_targets).
- "running": minus a running centre c, an exponential moving average of those batch means (DINO's centring):
  each training forward first moves c <- m c + (1 - m) mean_b(targets) (the first one sets c to its batch mean),
  then subtracts it. With few clips per micro-batch the batch mean is a noisy centre; c averages about
  1 / (1 - m) of them. A forward in eval mode subtracts c without moving it (the batch mean before any training
  forward).

The running centre is kept per rank (no collective in the forward: under data parallel each rank averages its
own micro-batches, which come from the same data). The training job saves every rank's centre in the
checkpoint's run state (`state` / `load`), so a resumed run continues with it; `train.init_from` starts a new run
and a new centre.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.targets import center_utterance_targets


class UtteranceCentre:
    """Centres CLS targets by `mode`; holds the running centre (D,) float32 for mode "running"."""

    def __init__(self, mode: str, momentum: float) -> None:
        if mode not in ("none", "batch", "running"):
            raise ValueError(f"unknown utterance_center {mode!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"utterance_center_momentum must lie in [0, 1), got {momentum}")
        self.mode = mode
        self.momentum = momentum
        self.value: Tensor | None = None

    def __call__(self, targets: Tensor, update: bool) -> Tensor:
        if self.mode != "running":
            return center_utterance_targets(targets, self.mode)
        batch_mean = targets.float().mean(dim=0)
        if self.value is None:
            centre = batch_mean
        else:
            centre = self.value.to(targets.device)
            if update:
                centre = self.momentum * centre + (1.0 - self.momentum) * batch_mean
        if update:
            self.value = centre.detach()
        return targets - centre

    def state(self) -> list[float] | None:
        """The running centre as exact floats (None before the first forward, and for the other modes)."""
        return None if self.value is None else self.value.detach().float().cpu().tolist()

    def load(self, state: list[float] | None, dim: int) -> None:
        """Set the running centre from `state` (as `state` returned it); None clears it."""
        if state is None:
            self.value = None
            return
        if len(state) != dim:
            raise ValueError(f"a saved utterance centre has {len(state)} values, the model's targets have {dim}")
        self.value = torch.tensor(state, dtype=torch.float32)
