"""Frozen feature extraction (SSLAM_SPEC §11): utterance and frame embeddings of raw fbank from an
encoder (student or teacher weights, whichever the caller passes), optionally every block's output;
the helper that fits arbitrary clip lengths to the patch grid; and the fine-tuned classifier
(fc_norm + linear head on the pooled tokens).

Features are the last block's output with no extra norm, as in the reference's `extract_features`.
Frame tokens are time-major: `frames.reshape(B, Tp, Fp, D)` gives a time series of Fp-token steps.

Pooling: "cls" (the CLS output), "mean" (all patch tokens, the reference's mean) or "content_mean" (the
patch tokens that hold content, model/padding.py's rule, from each clip's valid frame count).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from model.encoder import Encoder
from model.padding import check_valid_frames, content_tokens, zero_padding
from model.targets import masked_token_mean

Pooling = Literal["cls", "mean", "content_mean"]
LayerSelection = Literal["last", "all"]

HEAD_NORM_EPS = 1e-6


def pad_or_crop_frames(fbank: Tensor, patch_size: int, max_frames: int | None = None) -> Tensor:
    """Fit the time axis (-2) of raw fbank to the patch grid: keep the first `max_frames` frames (rounded
    down to a multiple of the patch size) when longer, then append zero frames up to the next multiple of
    the patch size. Zeros in the raw log-mel domain are the reference's padding (SSLAM_SPEC §1.8)."""
    frames = fbank.shape[-2]
    if max_frames is not None:
        limit = max_frames - max_frames % patch_size
        if limit <= 0:
            raise ValueError(f"max_frames={max_frames} holds no whole patch of {patch_size} frames")
        if frames > limit:
            fbank = fbank[..., :limit, :]
            frames = limit
    if frames == 0:
        raise ValueError("fbank has no frames")
    shortfall = -frames % patch_size
    if shortfall:
        padding = fbank.new_zeros(*fbank.shape[:-2], shortfall, fbank.shape[-1])
        fbank = torch.cat([fbank, padding], dim=-2)
    return fbank


def fit_to_encoder(fbank: Tensor, encoder: Encoder) -> Tensor:
    """`pad_or_crop_frames` to what the encoder accepts: a multiple of the patch size, at most the
    positional table's length (longer clips keep their head, like the reference's length rule)."""
    cfg = encoder.cfg
    return pad_or_crop_frames(fbank, cfg.patch_size, cfg.max_time_patches * cfg.patch_size)


def pool_tokens(hidden: Tensor, pooling: Pooling, content: Tensor | None = None) -> Tensor:
    """(B, 1 + N, D) -> (B, D): the CLS token, the mean of the N patch tokens, or ("content_mean") the mean
    of the patch tokens where `content` (B, N) bool is True."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        return hidden[:, 1:].mean(dim=1)
    if pooling == "content_mean":
        if content is None:
            raise ValueError("pooling='content_mean' needs each clip's valid frame count")
        return masked_token_mean(hidden[:, 1:], content)
    raise ValueError(f"pooling must be 'cls', 'mean' or 'content_mean', got {pooling!r}")


def content_mean_frames(frames: Tensor, valid_frames: Tensor, patch_size: int, freq_patches: int) -> Tensor:
    """(B, N, D) time-major frame tokens -> (B, D): their mean over the tokens holding content, from the valid
    frame counts (B,) of the clips (counts past the input's end count as full length)."""
    time_patches = frames.shape[1] // freq_patches
    valid = valid_frames.to(frames.device).clamp(max=time_patches * patch_size)
    return masked_token_mean(frames, content_tokens(valid, time_patches, freq_patches, patch_size))


def _check_input(encoder: Encoder, fbank: Tensor) -> None:
    if fbank.dim() not in (3, 4):
        raise ValueError(f"expected raw fbank (B, 1, T, F) or (B, T, F), got shape {tuple(fbank.shape)}")
    frames, patch = fbank.shape[-2], encoder.cfg.patch_size
    if frames % patch:
        raise ValueError(
            f"{frames} frames is not a multiple of the patch size {patch}: fit the input with "
            "model.features.fit_to_encoder (zero padding, as the reference pads)"
        )


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    fbank: Tensor,
    layers: LayerSelection = "last",
    pooling: Pooling = "cls",
    autocast_dtype: torch.dtype | None = None,
    valid_frames: Tensor | None = None,
) -> dict[str, Tensor | list[Tensor]]:
    """Embeddings of raw fbank (B, 1, T, F) or (B, T, F), in eval mode without gradients.

    `valid_frames` (B,) long, each clip's frame count before its padding (counts past T count as T), resets the
    padding frames to 0 as `model.padding: aware` training does and is needed by pooling="content_mean"; an
    encoder trained with `model.padding: aware` then also attends to content tokens only, as in training.
    Returns `utterance` (B, D): the CLS output (or the patch mean with pooling="mean", the content tokens'
    mean with "content_mean"); `frames`
    (B, N, D): the patch outputs in time-major order; with layers="all" also `layers`: every block's
    output (B, 1 + N, D), CLS first, last block last. Outputs are float32. T may be any multiple of the
    patch size up to the positional table; `autocast_dtype` (e.g. torch.bfloat16) runs under autocast.
    """
    if layers not in ("last", "all"):
        raise ValueError(f"layers must be 'last' or 'all', got {layers!r}")
    _check_input(encoder, fbank)
    device = encoder.pos_embed.device
    content = None
    if valid_frames is not None:
        valid = valid_frames.to(device).clamp(max=fbank.shape[-2])
        check_valid_frames(valid, fbank.shape[0], fbank.shape[-2])
        fbank = zero_padding(fbank.to(device), valid)
        patch = encoder.cfg.patch_size
        content = content_tokens(valid, fbank.shape[-2] // patch, encoder.cfg.mel_bins // patch, patch)
    elif pooling == "content_mean":
        raise ValueError("pooling='content_mean' needs valid_frames")
    block_outputs: list[Tensor] = []
    hooks = []
    if layers == "all":
        hooks = [
            block.register_forward_hook(lambda _module, _inputs, output: block_outputs.append(output[0]))
            for block in encoder.blocks
        ]
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            attended = content if getattr(encoder.cfg, "padding", "reference") == "aware" else None
            hidden, _ = encoder(fbank.to(device), return_ffn=False, content=attended)
    finally:
        encoder.train(was_training)
        for hook in hooks:
            hook.remove()
    hidden = hidden.float()
    features: dict[str, Tensor | list[Tensor]] = {
        "utterance": pool_tokens(hidden, pooling, content), "frames": hidden[:, 1:]
    }
    if layers == "all":
        features["layers"] = [output.float() for output in block_outputs]
    return features


def frames_grid(frames: Tensor, freq_patches: int) -> Tensor:
    """(B, N, D) time-major frame tokens -> (B, Tp, Fp, D)."""
    batch, tokens, dim = frames.shape
    if tokens % freq_patches:
        raise ValueError(f"{tokens} frame tokens are not whole time steps of {freq_patches} frequency patches")
    return frames.reshape(batch, tokens // freq_patches, freq_patches, dim)


class ClassifierHead(nn.Module):
    """fc_norm (LayerNorm, eps 1e-6) then a linear layer (SSLAM_SPEC §11); state keys fc_norm.*, head.*."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc_norm = nn.LayerNorm(dim, eps=HEAD_NORM_EPS)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02, a=-2.0, b=2.0)
        nn.init.zeros_(self.head.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.head(self.fc_norm(pooled))


class EncoderWithHead(nn.Module):
    """Raw fbank -> class logits (B, C): encoder, pooled last-block output, classifier head."""

    def __init__(self, encoder: Encoder, classifier: ClassifierHead, pooling: Pooling = "cls") -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.encoder = encoder
        self.classifier = classifier
        self.pooling = pooling

    def forward(self, fbank: Tensor) -> Tensor:
        _check_input(self.encoder, fbank)
        hidden, _ = self.encoder(fbank, return_ffn=False)
        return self.classifier(pool_tokens(hidden, self.pooling))
