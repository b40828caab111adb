"""The padding rule of `model.padding: aware`: which frames and patch tokens of a clip are content.

A clip of `valid` frames (its rows before the zero padding the front-end appends, shard metadata
"frames", batch key `valid_frames`) has content frames [0, valid) and padding frames [valid, T). A patch
token of time row t (frames [t p, (t + 1) p)) is content when it holds at least one content frame,
t p < valid, so only tokens that are entirely padding are padding tokens. A mixture lasts as long as its
primary: its content is the primary's (the partner's padding is silence there, `pipeline.mixing`
"silence"; what a log-mel mixture holds after the primary's end is zeroed like any padding).

In aware mode the model first sets every padding frame back to 0, the reference's padding value, so
nothing about the padding (its values, or a partner's content past the primary's end) reaches the losses.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_valid_frames(valid_frames: Tensor, num_clips: int, frames: int) -> None:
    if valid_frames.shape != (num_clips,) or valid_frames.dtype != torch.long:
        raise ValueError(
            f"valid_frames must be a long ({num_clips},) tensor, got {valid_frames.dtype} {tuple(valid_frames.shape)}"
        )
    if bool(((valid_frames < 1) | (valid_frames > frames)).any()):
        raise ValueError(f"valid_frames must lie in [1, {frames}], got {valid_frames.tolist()}")


def content_frames(valid_frames: Tensor, frames: int) -> Tensor:
    """bool (N, T): True on each clip's first valid_frames[i] frames."""
    positions = torch.arange(frames, device=valid_frames.device)
    return positions[None, :] < valid_frames[:, None]


def content_tokens(valid_frames: Tensor, time_patches: int, freq_patches: int, patch_size: int) -> Tensor:
    """bool (N, Tp * Fp) in time-major token order: True where a token holds at least one content frame."""
    rows = torch.arange(time_patches, device=valid_frames.device) * patch_size
    content_rows = rows[None, :] < valid_frames[:, None]
    return content_rows.repeat_interleave(freq_patches, dim=1)


def zero_padding(fbank: Tensor, valid_frames: Tensor) -> Tensor:
    """Raw fbank (N, 1, T, F) or (N, T, F) with every padding frame set to 0 (a new tensor)."""
    content = content_frames(valid_frames.to(fbank.device), fbank.shape[-2])
    if fbank.dim() == 4:
        content = content[:, None]
    return fbank.masked_fill(~content[..., None], 0.0)
