"""Inverse block masking: exact counts, block structure, uniform trim/top-up, determinism, index bookkeeping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from model.config import ModelConfig
from model.masking import (
    block_masks,
    block_union,
    keep_exactly,
    mask_counts,
    sample_centres,
    split_indices,
    visible_indices,
)


def test_base_counts_appendix_b():
    cfg = ModelConfig()
    assert mask_counts(512, cfg) == (5, 102)
    mask = block_masks(192, 64, 8, cfg, torch.Generator().manual_seed(0))
    assert mask.shape == (192, 512) and mask.dtype == torch.bool
    assert torch.all(mask.sum(dim=1) == 410)
    ids_keep, ids_restore = visible_indices(mask)
    assert 1 - ids_keep.shape[1] / ids_restore.shape[1] == pytest.approx(0.80078, abs=1e-5)


@pytest.mark.parametrize(
    "time_patches, freq_patches, mask_prob, mask_length",
    [(64, 8, 0.8, 5), (16, 2, 0.8, 5), (10, 7, 0.6, 3), (32, 4, 0.5, 4), (8, 8, 0.9, 2)],
)
def test_exact_visible_count_per_row(time_patches, freq_patches, mask_prob, mask_length):
    cfg = ModelConfig(mask_prob=mask_prob, mask_length=mask_length)
    num_patches = time_patches * freq_patches
    n_keep = math.floor(num_patches * (1 - mask_prob))
    mask = block_masks(300, time_patches, freq_patches, cfg, torch.Generator().manual_seed(1))
    assert torch.all((~mask).sum(dim=1) == n_keep)


def _naive_union(centres: torch.Tensor, time_patches: int, freq_patches: int, length: int) -> torch.Tensor:
    visible = torch.zeros(centres.shape[0], time_patches, freq_patches, dtype=torch.bool)
    offset = length // 2
    for row, row_centres in enumerate(centres.tolist()):
        for centre in row_centres:
            t0, f0 = divmod(centre, freq_patches)
            for dt, df in itertools.product(range(length), repeat=2):
                t = min(max(t0 + dt - offset, 0), time_patches - 1)
                f = min(max(f0 + df - offset, 0), freq_patches - 1)
                visible[row, t, f] = True
    return visible.reshape(centres.shape[0], -1)


@pytest.mark.parametrize("time_patches, freq_patches, length", [(64, 8, 5), (9, 3, 5), (12, 6, 4), (5, 5, 1)])
def test_block_union_is_union_of_clamped_blocks(time_patches, freq_patches, length):
    generator = torch.Generator().manual_seed(2)
    centres = sample_centres(20, time_patches * freq_patches, 4, generator)
    union = block_union(centres, time_patches, freq_patches, length)
    assert torch.equal(union, _naive_union(centres, time_patches, freq_patches, length))


def test_block_union_corner_clamps_onto_border():
    # Centre at (0, 0) of an 8 x 8 grid with L = 5: rows/cols -2, -1 clamp to 0, so the block is 3 x 3.
    union = block_union(torch.tensor([[0]]), 8, 8, 5).reshape(8, 8)
    assert union.sum() == 9 and union[:3, :3].all()


def test_final_visible_set_relates_to_block_union():
    """Same draws as block_masks: centres first. Rows with more block cells than n_keep keep a subset of
    them; rows with fewer keep all block cells plus random extras."""
    cfg = ModelConfig()
    n_centers, n_keep = mask_counts(512, cfg)
    mask = block_masks(400, 64, 8, cfg, torch.Generator().manual_seed(3))
    centres = sample_centres(400, 512, n_centers, torch.Generator().manual_seed(3))
    union = block_union(centres, 64, 8, cfg.mask_length)
    visible = ~mask
    trimmed = union.sum(1) >= n_keep
    assert trimmed.any() and (~trimmed).any()
    assert torch.all((visible & ~union)[trimmed].sum(1) == 0)
    assert torch.all((union & ~visible)[~trimmed].sum(1) == 0)


def test_trim_is_uniform_over_block_cells():
    visible = torch.zeros(4000, 20, dtype=torch.bool)
    visible[:, :10] = True
    kept = keep_exactly(visible, 5, torch.Generator().manual_seed(4))
    assert torch.all(kept.sum(1) == 5) and not kept[:, 10:].any()
    frequency = kept[:, :10].float().mean(0)
    assert torch.all((frequency - 0.5).abs() < 0.04)


def test_top_up_is_uniform_over_other_cells():
    visible = torch.zeros(4000, 20, dtype=torch.bool)
    visible[:, :3] = True
    kept = keep_exactly(visible, 8, torch.Generator().manual_seed(5))
    assert torch.all(kept.sum(1) == 8) and kept[:, :3].all()
    frequency = kept[:, 3:].float().mean(0)
    assert torch.all((frequency - 5 / 17).abs() < 0.04)


def test_deterministic_under_seed():
    cfg = ModelConfig()
    first = block_masks(16, 64, 8, cfg, torch.Generator().manual_seed(7))
    again = block_masks(16, 64, 8, cfg, torch.Generator().manual_seed(7))
    other = block_masks(16, 64, 8, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # rows are independent


@pytest.mark.parametrize("mask_prob", [0.0, 0.999])
def test_degenerate_mask_prob_raises(mask_prob):
    with pytest.raises(ValueError):
        block_masks(2, 8, 2, ModelConfig(mask_prob=mask_prob), torch.Generator())


def test_indices_drop_and_restore():
    mask = block_masks(6, 16, 4, ModelConfig(), torch.Generator().manual_seed(9))
    ids_keep, ids_masked, ids_restore = split_indices(mask)
    assert ids_keep.shape == (6, 12) and ids_masked.shape == (6, 52)
    for row in range(6):
        assert ids_keep[row].tolist() == torch.nonzero(~mask[row]).flatten().tolist()
        assert ids_masked[row].tolist() == torch.nonzero(mask[row]).flatten().tolist()
    sequence = torch.randn(6, 64, 3)
    visible = torch.gather(sequence, 1, ids_keep[..., None].expand(-1, -1, 3))
    masked = torch.gather(sequence, 1, ids_masked[..., None].expand(-1, -1, 3))
    restored = torch.gather(torch.cat([visible, masked], 1), 1, ids_restore[..., None].expand(-1, -1, 3))
    assert torch.equal(restored, sequence)


def test_unequal_rows_rejected():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :4] = True
    with pytest.raises(ValueError):
        visible_indices(mask)
