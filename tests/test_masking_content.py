"""Content masks of `model.padding: aware` (masking.content_block_masks): the mask ratio applies to each
clip's content, the visible count per row stays the reference's, and full-length rows get block_masks' masks."""

from __future__ import annotations

import math

import torch

from model.config import ModelConfig
from model.masking import block_masks, content_block_masks, mask_counts

CFG = ModelConfig(target_length=512, mel_bins=64)  # a 32 x 4 grid, 25 visible of 128
GRID = (32, 4)


def test_full_length_rows_get_the_reference_masks_bit_for_bit():
    reference = block_masks(40, *GRID, CFG, torch.Generator().manual_seed(5))
    content = content_block_masks(torch.full((40,), GRID[0]), *GRID, CFG, torch.Generator().manual_seed(5))
    assert torch.equal(reference, content)


def test_short_rows_keep_a_fifth_of_their_content_visible_and_fill_up_with_padding():
    rows = torch.tensor([1, 2, 5, 10, 20, 31, 32, 3] * 50)
    mask = content_block_masks(rows, *GRID, CFG, torch.Generator().manual_seed(0))
    visible = ~mask
    _, n_keep = mask_counts(128, CFG)
    assert torch.all(visible.sum(dim=1) == n_keep)
    for row, content_rows in enumerate(rows.tolist()):
        tokens = content_rows * GRID[1]
        expected = max(1, math.floor(tokens * (1.0 - CFG.mask_prob)))
        assert int(visible[row, :tokens].sum()) == min(expected, n_keep), (row, content_rows)
    # The reference's masks leave a 1-row (4-token) clip without any visible content most of the time.
    reference = ~block_masks(400, *GRID, CFG, torch.Generator().manual_seed(0))
    assert float((reference[:, :4].sum(dim=1) == 0).float().mean()) > 0.5


def test_visible_content_of_a_half_clip_comes_in_blocks_inside_the_content():
    rows = torch.full((200,), 16)
    visible = ~content_block_masks(rows, *GRID, CFG, torch.Generator().manual_seed(1))
    content = visible[:, :64].view(200, 16, 4)
    # 12 of 64 content cells visible; block structure: most visible cells have a visible time neighbour.
    assert torch.all(content.sum(dim=(1, 2)) == 12)
    neighbour = torch.zeros_like(content)
    neighbour[:, 1:] |= content[:, :-1]
    neighbour[:, :-1] |= content[:, 1:]
    assert float((content & neighbour).sum() / content.sum()) > 0.6


def test_deterministic_under_seed():
    rows = torch.tensor([3, 32, 7])
    first = content_block_masks(rows, *GRID, CFG, torch.Generator().manual_seed(9))
    assert torch.equal(first, content_block_masks(rows, *GRID, CFG, torch.Generator().manual_seed(9)))
