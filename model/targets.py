"""Teacher targets (SSLAM_SPEC §7, §9.3): per-layer instance norm over tokens, top-k layer average,
final LayerNorm; the utterance (CLS) target; and stage 2's time-row dropping and source-retention target.

Every function here takes patch tokens only: callers drop the CLS position (index 0) first.
All targets are float32 whatever the input dtype. `content` (b, n) bool, given with `model.padding: aware`
(model/padding.py), restricts the instance norm and the CLS mean to content tokens; padding tokens then
get target 0 (they are left out of every loss). Without it the functions are the reference's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TARGET_NORM_EPS = 1e-5


def instance_norm_tokens(features: Tensor, content: Tensor | None = None) -> Tensor:
    """(b, n, D) -> (b, n, D) float32: each (clip, channel) normalised over its n tokens, biased
    variance, no affine. With `content`, the statistics are over the content tokens only and padding
    tokens are 0."""
    if content is None:
        return F.instance_norm(features.float().transpose(1, 2), eps=TARGET_NORM_EPS).transpose(1, 2)
    padding = ~content.to(features.device).unsqueeze(-1)
    count = (~padding).sum(dim=1, keepdim=True).clamp_min(1).float()
    values = features.float().masked_fill(padding, 0.0)
    mean = values.sum(dim=1, keepdim=True) / count
    centred = (values - mean).masked_fill(padding, 0.0)
    variance = centred.pow(2).sum(dim=1, keepdim=True) / count
    return centred * torch.rsqrt(variance + TARGET_NORM_EPS)


def make_targets(ffn_outputs: list[Tensor], top_k: int, content: Tensor | None = None) -> Tensor:
    """Patch targets (b, n, D) from the per-block FFN outputs (each (b, n, D), CLS removed): the mean of
    the instance-normed last top_k layers, then LayerNorm over D without affine (per token, so padding
    tokens, 0 after a content-only instance norm, stay 0)."""
    if not 1 <= top_k <= len(ffn_outputs):
        raise ValueError(f"top_k={top_k} outside [1, {len(ffn_outputs)}] layers")
    layers = ffn_outputs[-top_k:]
    average = instance_norm_tokens(layers[0], content)
    for layer in layers[1:]:
        average = average + instance_norm_tokens(layer, content)
    average = average / top_k
    return F.layer_norm(average, average.shape[-1:], eps=TARGET_NORM_EPS)


def cls_target(patch_targets: Tensor, content: Tensor | None = None) -> Tensor:
    """Utterance target (b, D): the mean over token positions of a patch target (§7.5), over the content
    tokens only when `content` is given. Stage 1 passes the top-k target, stage 2 `make_targets(ffn_outputs,
    1)` (last layer only)."""
    if content is None:
        return patch_targets.mean(dim=1)
    return masked_token_mean(patch_targets, content)


def utterance_target(ffn_outputs: list[Tensor], top_k: int, content: Tensor | None = None) -> Tensor:
    """The `model.utterance_norm: layer_norm` CLS target (b, D) float32: each of the last top_k layers
    LayerNormed over D per token (no affine), averaged over the layers, then averaged over the (content)
    tokens. Unlike the instance-normed target, whose per-clip channel means are 0 by construction, this keeps
    the part of the teacher's features that a clip's tokens share: what the clip is."""
    if not 1 <= top_k <= len(ffn_outputs):
        raise ValueError(f"top_k={top_k} outside [1, {len(ffn_outputs)}] layers")
    layers = ffn_outputs[-top_k:]
    average = sum(F.layer_norm(layer.float(), layer.shape[-1:], eps=TARGET_NORM_EPS) for layer in layers) / top_k
    return average.mean(dim=1) if content is None else masked_token_mean(average, content)


def center_utterance_targets(targets: Tensor, mode: str) -> Tensor:
    """The `model.utterance_center` step on CLS targets (b, D) float32: "none" returns them as they are,
    "batch" subtracts their mean across the b rows per dimension (DINO-style centring, so the CLS must encode
    what differs between clips). Under data parallel the batch is the rank's micro-batch."""
    if mode == "none":
        return targets
    if mode == "batch":
        return targets - targets.mean(dim=0, keepdim=True)
    raise ValueError(f"unknown utterance_center {mode!r}")


def masked_token_mean(tokens: Tensor, content: Tensor) -> Tensor:
    """(b, n, D), bool (b, n) -> (b, D) float32: the mean over each row's True tokens (0 for a row with none)."""
    keep = content.to(tokens.device).unsqueeze(-1)
    total = tokens.float().masked_fill(~keep, 0.0).sum(dim=1)
    return total / keep.sum(dim=1).clamp_min(1).float()


def kept_time_rows(nomix: Tensor) -> Tensor:
    """(b, Tp - 2r) indices of the time rows that are not no-mix rows, ascending; every row of `nomix`
    must have the same count of True."""
    if nomix.dim() != 2 or nomix.dtype != torch.bool:
        raise ValueError(f"nomix must be a bool (b, Tp) tensor, got {nomix.dtype} {tuple(nomix.shape)}")
    dropped = nomix.sum(dim=1)
    if bool((dropped != dropped[0]).any()):
        raise ValueError("every clip must have the same number of no-mix time rows")
    num_kept = nomix.shape[1] - int(dropped[0])
    return torch.argsort(nomix.to(torch.uint8), dim=1, stable=True)[:, :num_kept]


def _row_token_index(rows: Tensor, freq_patches: int) -> Tensor:
    """Time-row indices (b, k) -> token indices (b, k * Fp) of all their frequency patches, in order."""
    columns = torch.arange(freq_patches, device=rows.device)
    return (rows[:, :, None] * freq_patches + columns).flatten(1)


def drop_time_rows(tokens: Tensor, nomix: Tensor, freq_patches: int) -> Tensor:
    """Per clip, delete every token of the time rows where nomix is True, keeping order:
    (b, Tp * Fp, D) -> (b, (Tp - 2r) * Fp, D) (§9.2, §14.2)."""
    batch, num_tokens, dim = tokens.shape
    if num_tokens != nomix.shape[1] * freq_patches or nomix.shape[0] != batch:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} do not match nomix {tuple(nomix.shape)} with {freq_patches} freq patches"
        )
    index = _row_token_index(kept_time_rows(nomix).to(tokens.device), freq_patches)
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, dim))


def scatter_time_rows(row_tokens: Tensor, nomix: Tensor, freq_patches: int) -> Tensor:
    """Inverse of drop_time_rows: (b, (Tp - 2r) * Fp, D) -> (b, Tp * Fp, D) with zeros on the no-mix rows."""
    batch, _, dim = row_tokens.shape
    index = _row_token_index(kept_time_rows(nomix).to(row_tokens.device), freq_patches)
    full = row_tokens.new_zeros(batch, nomix.shape[1] * freq_patches, dim)
    return full.scatter_(1, index.unsqueeze(-1).expand(-1, -1, dim), row_tokens)


def source_retention_target(
    y_full: Tensor, y_drop: Tensor, nomix: Tensor, freq_patches: int, partner_content: Tensor | None = None
) -> Tensor:
    """Y^R (b, N, D) for mixture rows (§9.3): on no-mix rows the primary's clean target y_full, elsewhere
    the average of y_full and the partner's dropped-row target y_drop ((b, (Tp - 2r) * Fp, D), already
    aligned with the mixture row, no roll). Not re-normalised. With `partner_content` (b, N) bool, the
    partner's content tokens aligned with the mixture row, y_full also stands wherever the partner is padding
    (absent, like on the no-mix rows)."""
    partner = scatter_time_rows(y_drop, nomix, freq_patches)
    primary_only = nomix.to(y_full.device).repeat_interleave(freq_patches, dim=1)
    if partner_content is not None:
        primary_only = primary_only | ~partner_content.to(y_full.device)
    return torch.where(primary_only.unsqueeze(-1), y_full, 0.5 * (y_full + partner))
