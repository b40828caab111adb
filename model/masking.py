"""Inverse block masking (SSLAM_SPEC §4), vectorised over mask rows, and the index bookkeeping that
drops masked tokens from the student and restores the original order for the decoder.

A mask row covers the N = Tp * Fp patch tokens of one (clip, clone) in time-major order; True = masked.
Random draws, in this order, from the given generator: the block centres, then one uniform key per cell.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.config import ModelConfig


def mask_counts(num_patches: int, cfg: ModelConfig) -> tuple[int, int]:
    """(n_centers, n_keep) of one row: floor(N (keep + adjust) / L^2) and floor(N keep), keep = 1 - mask_prob."""
    keep_prob = 1.0 - cfg.mask_prob
    n_centers = math.floor(num_patches * (keep_prob + cfg.mask_prob_adjust) / cfg.mask_length**2)
    n_keep = math.floor(num_patches * keep_prob)
    if not 1 <= n_keep < num_patches:
        raise ValueError(
            f"mask_prob={cfg.mask_prob} leaves {n_keep} of {num_patches} patches visible; "
            "need at least one visible and one masked patch"
        )
    return max(n_centers, 0), n_keep


def sample_centres(num_rows: int, num_patches: int, n_centers: int, generator: torch.Generator) -> Tensor:
    """Block centres (rows, n_centers), uniform over the N cells with replacement."""
    return torch.randint(0, num_patches, (num_rows, n_centers), generator=generator, device=generator.device)


def block_union(centres: Tensor, time_patches: int, freq_patches: int, mask_length: int) -> Tensor:
    """Visible cells (rows, N): the union of L x L blocks around each centre, out-of-grid cells clamped
    onto the border (offsets -L//2 .. L - 1 - L//2, as the reference)."""
    rows = centres.shape[0]
    offsets = torch.arange(mask_length, device=centres.device) - mask_length // 2
    t = (centres // freq_patches)[:, :, None, None] + offsets[:, None]
    f = (centres % freq_patches)[:, :, None, None] + offsets[None, :]
    cells = t.clamp(0, time_patches - 1) * freq_patches + f.clamp(0, freq_patches - 1)
    visible = torch.zeros(rows, time_patches * freq_patches, dtype=torch.bool, device=centres.device)
    return visible.scatter_(1, cells.reshape(rows, -1), True)


def keep_exactly(visible: Tensor, n_keep: int, generator: torch.Generator) -> Tensor:
    """Trim or top up each row to exactly n_keep visible cells with uniform choices: a row with more
    visible cells keeps a uniform subset of them; a row with fewer keeps all and adds a uniform subset of
    the others. Done as top-k of (2 * visible + uniform key)."""
    keys = torch.rand(visible.shape, generator=generator, device=visible.device)
    kept = torch.topk(visible.to(keys.dtype) * 2.0 + keys, n_keep, dim=1).indices
    return torch.zeros_like(visible).scatter_(1, kept, True)


def block_masks(
    num_rows: int, time_patches: int, freq_patches: int, cfg: ModelConfig, generator: torch.Generator
) -> Tensor:
    """BoolTensor (num_rows, Tp * Fp), True = masked, exactly n_keep = floor(N (1 - mask_prob)) visible
    per row (§4). Computed on the generator's device."""
    num_patches = time_patches * freq_patches
    n_centers, n_keep = mask_counts(num_patches, cfg)
    centres = sample_centres(num_rows, num_patches, n_centers, generator)
    visible = block_union(centres, time_patches, freq_patches, cfg.mask_length)
    return ~keep_exactly(visible, n_keep, generator)


def content_block_masks(
    content_rows: Tensor, time_patches: int, freq_patches: int, cfg: ModelConfig, generator: torch.Generator
) -> Tensor:
    """`model.padding: aware` masks (num_rows, Tp * Fp), True = masked, for rows whose content is their
    first content_rows[i] >= 1 time rows: the mask ratio applies to the content. Each row keeps
    c = max(1, floor(C (1 - mask_prob))) of its C content tokens visible, chosen as in block_masks within the
    content (centres uniform over it, blocks clamped onto its last row), and fills the other n_keep - c
    visible slots (n_keep of block_masks, the same for every row) with uniformly chosen padding tokens;
    a row with fewer padding tokens than that keeps more content. Same draws as block_masks, so rows of full
    length get exactly block_masks' masks."""
    num_rows = content_rows.shape[0]
    num_patches = time_patches * freq_patches
    n_centers, n_keep = mask_counts(num_patches, cfg)
    content_rows = content_rows.to(generator.device)
    content_tokens = content_rows * freq_patches
    centres = sample_centres(num_rows, num_patches, n_centers, generator)
    centres = centres * content_tokens[:, None] // num_patches  # uniform over each row's content
    offsets = torch.arange(cfg.mask_length, device=centres.device) - cfg.mask_length // 2
    t = (centres // freq_patches)[:, :, None, None] + offsets[:, None]
    f = (centres % freq_patches)[:, :, None, None] + offsets[None, :]
    t = torch.minimum(t.clamp_min(0), (content_rows - 1)[:, None, None, None])
    cells = t * freq_patches + f.clamp(0, freq_patches - 1)
    visible = torch.zeros(num_rows, num_patches, dtype=torch.bool, device=centres.device)
    visible.scatter_(1, cells.reshape(num_rows, -1), True)
    keys = torch.rand(visible.shape, generator=generator, device=visible.device)
    is_content = torch.arange(num_patches, device=visible.device)[None, :] < content_tokens[:, None]
    padding_slots = num_patches - content_tokens
    keep_content = (content_tokens.double() * (1.0 - cfg.mask_prob)).floor().long().clamp_min(1)  # as mask_counts
    keep_content = torch.maximum(keep_content.clamp_max(n_keep), n_keep - padding_slots)
    # Content first (block cells before the rest), padding after: a row keeps its keep_content best
    # content cells and n_keep - keep_content padding cells.
    score = visible.to(keys.dtype) * 2.0 + keys + is_content.to(keys.dtype) * 4.0
    rank = torch.argsort(torch.argsort(score, dim=1, descending=True), dim=1)
    padding_rank = rank - content_tokens[:, None]
    kept = torch.where(is_content, rank < keep_content[:, None], padding_rank < (n_keep - keep_content)[:, None])
    return ~kept


def split_indices(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(ids_keep (rows, n_keep), ids_masked (rows, n_mask), ids_restore (rows, N)) of a mask whose rows
    all have the same count. Visible and masked positions each come in ascending order."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be (rows, N), got {tuple(mask.shape)}")
    masked_per_row = mask.sum(dim=1)
    n_mask = int(masked_per_row[0])
    if bool((masked_per_row != n_mask).any()):
        raise ValueError("every mask row must mask the same number of patches")
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    n_keep = mask.shape[1] - n_mask
    return ids_shuffle[:, :n_keep], ids_shuffle[:, n_keep:], ids_restore


def visible_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(ids_keep (rows, n_keep), ids_restore (rows, N)): gather ids_keep to drop masked tokens; gather
    [visible; masked] with ids_restore to return to the original order."""
    ids_keep, _, ids_restore = split_indices(mask)
    return ids_keep, ids_restore
