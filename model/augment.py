"""Fine-tuning augmentations of a batch of normalised fbank (SSLAM_SPEC §11): batch mixup, then SpecAugment.

Both draw from a torch.Generator, so a seeded step replays exactly. Inputs are (B, 1, T, F) normalised fbank
and (B, C) multi-hot labels; training only (the caller decides).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    """A numpy generator seeded from `generator` (torch has no seeded Beta sampler)."""
    seed = torch.randint(0, 2**62, (1,), generator=generator).item()
    return np.random.default_rng(seed)


def batch_mixup(
    x: Tensor, labels: Tensor, alpha: float, prob: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, float]:
    """With probability `prob`, one lambda ~ Beta(alpha, alpha) for the batch: x <- lambda x + (1 - lambda) flip(x)
    and the same for the labels, flip being the batch reversal (the reference's mode "batch"). Returns
    (x, labels, lambda); lambda is 1.0 when no mixup happened (alpha 0 or prob 0 included)."""
    rng = _numpy_rng(generator)
    if alpha <= 0 or rng.random() >= prob:
        return x, labels, 1.0
    lam = float(rng.beta(alpha, alpha))
    mixed_x = lam * x + (1.0 - lam) * x.flip(0)
    mixed_labels = lam * labels + (1.0 - lam) * labels.flip(0)
    return mixed_x, mixed_labels, lam


def mask_ranges(size: int, param: float, count: int, generator: torch.Generator | None = None) -> Tensor:
    """(count, 2) [start, end) of one mask per example, torchaudio's iid rule: v ~ U(0, param),
    s ~ U(0, size - v), range [floor(s), floor(s) + floor(v))."""
    value = torch.rand(count, generator=generator, dtype=torch.float64) * param
    start = torch.rand(count, generator=generator, dtype=torch.float64) * (size - value)
    start = start.floor().long()
    return torch.stack([start, start + value.floor().long()], dim=1)


def spec_augment(
    x: Tensor, freq_param: float, time_param: float, generator: torch.Generator | None = None, fill: float = 0.0
) -> Tensor:
    """One frequency and one time mask per example (independent across the batch), cells set to `fill`
    (0 in the normalised domain). x: (B, 1, T, F); returns a new tensor."""
    batch, frames, bins = x.shape[0], x.shape[-2], x.shape[-1]
    freq = mask_ranges(bins, min(freq_param, bins), batch, generator).to(x.device)
    time = mask_ranges(frames, min(time_param, frames), batch, generator).to(x.device)
    bin_index = torch.arange(bins, device=x.device)
    frame_index = torch.arange(frames, device=x.device)
    freq_mask = (bin_index[None] >= freq[:, :1]) & (bin_index[None] < freq[:, 1:])  # (B, F)
    time_mask = (frame_index[None] >= time[:, :1]) & (frame_index[None] < time[:, 1:])  # (B, T)
    masked = freq_mask[:, None, :] | time_mask[:, :, None]  # (B, T, F)
    return x.masked_fill(masked.unsqueeze(1), fill)
