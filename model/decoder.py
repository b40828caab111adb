"""The student's lightweight CNN decoder (SSLAM_SPEC §5) and the construction of its input: visible
encoder outputs plus noise mask tokens, restored to the original token order.

The token grid is kept channels-last, (R, Tp, Fp, C), which is a free view of the time-major token
sequence; the grouped conv runs on it in channels_last memory format, so the per-position channel
LayerNorm, GELU and residual need no transposes or copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig

CHANNEL_NORM_EPS = 1e-5  # fairseq LayerNorm default; the decoder norm has no affine


def decoder_input(visible: Tensor, ids_restore: Tensor, noise_std: float) -> Tensor:
    """Visible encoder outputs (R, n_keep, D) plus N - n_keep fresh N(0, noise_std^2) mask tokens,
    gathered back to the original order with ids_restore (R, N) -> (R, N, D). Noise uses the global RNG."""
    rows, n_keep, dim = visible.shape
    num_patches = ids_restore.shape[1]
    noise = torch.randn(rows, num_patches - n_keep, dim, device=visible.device, dtype=visible.dtype)
    tokens = torch.cat([visible, noise * noise_std], dim=1)
    return torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))


class DecoderLayer(nn.Module):
    """y <- y + GELU(LN_channels(GroupedConv(y))) on a channels-last grid."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"decoder_kernel must be odd (same padding), got {kernel}")
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=groups)

    def forward(self, grid: Tensor) -> Tensor:
        """grid (R, Tp, Fp, C) -> (R, Tp, Fp, C)."""
        conv = self.conv(grid.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
        conv = conv.permute(0, 2, 3, 1)
        return grid + F.gelu(F.layer_norm(conv, conv.shape[-1:], eps=CHANNEL_NORM_EPS))


class Decoder(nn.Module):
    """(R, N, D) tokens in time-major order -> (R, N, D) predictions for every position."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.input_proj = nn.Linear(cfg.embed_dim, cfg.decoder_dim) if cfg.decoder_dim != cfg.embed_dim else None
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.decoder_dim, cfg.decoder_kernel, cfg.decoder_groups) for _ in range(cfg.decoder_layers)
        )
        self.proj = nn.Linear(cfg.decoder_dim, cfg.embed_dim)

    def forward(self, tokens: Tensor, time_patches: int, freq_patches: int) -> Tensor:
        rows, num_patches, _ = tokens.shape
        if num_patches != time_patches * freq_patches:
            raise ValueError(f"{num_patches} tokens do not fill a {time_patches} x {freq_patches} grid")
        x = self.input_proj(tokens) if self.input_proj is not None else tokens
        grid = x.reshape(rows, time_patches, freq_patches, x.shape[-1])
        for layer in self.layers:
            grid = layer(grid)
        return self.proj(grid.reshape(rows, num_patches, -1))
