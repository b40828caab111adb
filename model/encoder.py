"""The ViT encoder shared by student and teacher: input normalisation, patch embedding, the fixed
2-D sin-cos positional table, CLS token, pre-LayerNorm and post-norm transformer blocks
(SSLAM_SPEC §1.9, §2, §3).

Token order is time-major: patch token n holds time patch t = n // Fp and frequency patch f = n % Fp.
Submodule names are the state-dict contract used by checkpoint import; keep them stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(len(positions), dim) = [sin(pos * omega) | cos(pos * omega)], omega_k = 10000^(-k / (dim/2)), float32."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float32)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_position_table(time_patches: int, freq_patches: int, dim: int) -> Tensor:
    """Fixed 2-D table (1, time_patches * freq_patches, dim); row t * Fp + f is
    [sin(f w) | cos(f w) | sin(t w) | cos(t w)]: the first half encodes frequency, the second time (§2)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs embed_dim divisible by 4, got {dim}")
    t = torch.arange(time_patches).repeat_interleave(freq_patches)
    f = torch.arange(freq_patches).repeat(time_patches)
    table = torch.cat([sincos_1d(dim // 2, f), sincos_1d(dim // 2, t)], dim=1)
    return table.unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout: q | k | v channel blocks)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, keys: Tensor | None = None) -> Tensor:
        """`keys` (B, n) bool: the tokens every query may attend to (all when None)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if keys is None else keys[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: in training, each example's residual branch is zeroed with probability `rate` and
    the survivors scaled by 1 / (1 - rate). Rate 0 (pre-training) or eval mode returns `x` itself."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """Post-norm block: u = LN1(h + Attn(h)); f = MLP(u); returns (LN2(u + f), f) (§3).

    `drop_path` (fine-tuning, SSLAM_SPEC §11) drops the attention and MLP branches per example; it is 0 unless
    set (model.finetune.set_drop_path), so pre-training is unchanged."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = 0.0

    def forward(self, h: Tensor, keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u = self.norm1(h + drop_path(self.attn(h, keys), self.drop_path, self.training))
        ffn = self.mlp(u)
        return self.norm2(u + drop_path(ffn, self.drop_path, self.training)), ffn


class Encoder(nn.Module):
    """Raw fbank (B, 1, T, F) -> (B, 1 + N, D) token features plus every block's raw FFN output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dim, patch = cfg.embed_dim, cfg.patch_size
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.register_buffer(
            "pos_embed", sincos_position_table(cfg.max_time_patches, cfg.freq_patches, dim), persistent=True
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pre_norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps) for _ in range(cfg.depth)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT-style init (§3): Linear N(0, 0.02) / bias 0, LayerNorm 1 / 0, patch conv xavier on (D, p*p)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.patch_embed.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token)

    def normalize(self, x: Tensor) -> Tensor:
        """Raw fbank -> model input: (x - mean) / (2 * std) (§1.9)."""
        return (x - self.cfg.norm_mean) / (2.0 * self.cfg.norm_std)

    def grid(self, x: Tensor) -> tuple[int, int]:
        """(time_patches, freq_patches) of a raw fbank batch, with a clear error for shapes that do not fit."""
        frames, bins = x.shape[-2:]
        patch = self.cfg.patch_size
        if bins != self.cfg.mel_bins:
            raise ValueError(f"input has {bins} mel bins, the model expects {self.cfg.mel_bins}")
        if frames % patch or frames == 0:
            raise ValueError(f"input length {frames} frames is not a positive multiple of patch_size {patch}")
        if frames // patch > self.cfg.max_time_patches:
            raise ValueError(
                f"input of {frames} frames exceeds the positional table "
                f"({self.cfg.max_time_patches} time patches of {patch} frames)"
            )
        return frames // patch, bins // patch

    def embed(self, x: Tensor) -> Tensor:
        """Raw fbank (B, 1, T, F) or (B, T, F) -> (B, N, D) patch tokens plus positions, time-major."""
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected raw fbank of shape (B, 1, T, F) or (B, T, F), got {tuple(x.shape)}")
        # Normalise in fp32, then meet the conv's weights (fp32, or bf16 when an engine casts the module).
        return self.embed_normalized(self.normalize(x.float()))

    def embed_normalized(self, x: Tensor) -> Tensor:
        """Normalised fbank (B, 1, T, F) -> (B, N, D) patch tokens plus positions (fine-tuning augments between
        normalisation and this step, SSLAM_SPEC §11)."""
        time_patches, freq_patches = self.grid(x)
        tokens = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        return tokens + self.pos_embed[:, : time_patches * freq_patches].to(tokens.dtype)

    def contextualize(
        self, tokens: Tensor, return_ffn: bool = True, content: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Patch tokens (B, n, D) -> (h (B, 1 + n, D), per-block raw FFN outputs (B, 1 + n, D), CLS first).

        The FFN list is empty when return_ffn is False. `content` (B, n) bool (`model.padding: aware`):
        attention reads only the CLS and the content tokens (padding tokens still get outputs).
        """
        keys = None
        if content is not None:
            keys = torch.cat([content.new_ones(content.shape[0], 1), content], dim=1).to(tokens.device)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        h = self.pre_norm(torch.cat([cls, tokens], dim=1))
        ffn_outputs: list[Tensor] = []
        for block in self.blocks:
            h, ffn = block(h, keys)
            if return_ffn:
                ffn_outputs.append(ffn)
        return h, ffn_outputs

    def forward(
        self, x: Tensor, return_ffn: bool = True, content: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Unmasked encoding of raw fbank (teacher targets, feature extraction); `content` as in contextualize."""
        return self.contextualize(self.embed(x), return_ffn=return_ffn, content=content)
