"""Teacher targets on hand-built layer outputs; stage-2 row dropping and the source-retention target."""

from __future__ import annotations

import pytest
import torch

from model.targets import (
    cls_target,
    drop_time_rows,
    instance_norm_tokens,
    kept_time_rows,
    make_targets,
    scatter_time_rows,
    source_retention_target,
)


def _manual_instance_norm(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def _manual_layer_norm(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def test_instance_norm_over_tokens():
    x = torch.randn(2, 10, 4) * 3 + torch.arange(4.0)
    normed = instance_norm_tokens(x.to(torch.bfloat16))
    assert normed.dtype == torch.float32
    torch.testing.assert_close(instance_norm_tokens(x), _manual_instance_norm(x), atol=1e-5, rtol=1e-5)
    hand = torch.tensor([[[1.0], [3.0]]])  # mean 2, biased var 1
    torch.testing.assert_close(instance_norm_tokens(hand), torch.tensor([[[-1.0], [1.0]]]) / (1 + 1e-5) ** 0.5)


def test_make_targets_top_k_average_then_layer_norm():
    torch.manual_seed(0)
    layers = [torch.randn(2, 6, 5) * (i + 1) for i in range(4)]
    expected = _manual_layer_norm(sum(_manual_instance_norm(f) for f in layers[1:]) / 3)
    torch.testing.assert_close(make_targets(layers, 3), expected, atol=1e-5, rtol=1e-5)
    changed_first = [torch.randn(2, 6, 5)] + layers[1:]
    torch.testing.assert_close(make_targets(changed_first, 3), make_targets(layers, 3))
    last_only = _manual_layer_norm(_manual_instance_norm(layers[-1]))
    torch.testing.assert_close(make_targets(layers, 1), last_only, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        make_targets(layers, 5)


def test_cls_target_is_token_mean():
    targets = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(cls_target(targets), targets.mean(1))


def _token_grid(batch: int, time_patches: int, freq_patches: int) -> torch.Tensor:
    """Token value = its index n = t * Fp + f (plus 1000 * clip), feature dim 2."""
    index = torch.arange(time_patches * freq_patches, dtype=torch.float32)
    values = index[None, :] + 1000 * torch.arange(batch, dtype=torch.float32)[:, None]
    return torch.stack([values, -values], dim=-1)


def test_drop_time_rows_per_sample_keeps_order():
    nomix = torch.zeros(2, 6, dtype=torch.bool)
    nomix[0, [0, 3]] = True
    nomix[1, [4, 5]] = True
    tokens = _token_grid(2, 6, 3)
    dropped = drop_time_rows(tokens, nomix, 3)
    assert dropped.shape == (2, 12, 2)
    clip0_rows, clip1_rows = [1, 2, 4, 5], [0, 1, 2, 3]
    assert dropped[0, :, 0].tolist() == [t * 3 + f for t in clip0_rows for f in range(3)]
    assert dropped[1, :, 0].tolist() == [1000 + t * 3 + f for t in clip1_rows for f in range(3)]
    assert kept_time_rows(nomix).tolist() == [clip0_rows, clip1_rows]


def test_scatter_inverts_drop_with_zeros_on_dropped_rows():
    nomix = torch.zeros(3, 8, dtype=torch.bool)
    nomix[0, [1, 2]] = True
    nomix[1, [0, 7]] = True
    nomix[2, [3, 6]] = True
    tokens = torch.randn(3, 16, 5)
    restored = scatter_time_rows(drop_time_rows(tokens, nomix, 2), nomix, 2)
    keep = (~nomix).repeat_interleave(2, dim=1)
    assert torch.equal(restored[keep], tokens[keep])
    assert torch.count_nonzero(restored[~keep]) == 0


def test_unequal_nomix_counts_rejected():
    nomix = torch.zeros(2, 6, dtype=torch.bool)
    nomix[0, 0] = True
    with pytest.raises(ValueError):
        drop_time_rows(torch.zeros(2, 12, 1), nomix, 2)


def test_source_retention_target_hand_built():
    time_patches, freq_patches, dim = 6, 2, 3
    nomix = torch.zeros(2, time_patches, dtype=torch.bool)
    nomix[0, [1, 4]] = True
    nomix[1, [0, 5]] = True
    y_full = torch.randn(2, time_patches * freq_patches, dim)
    partner_full = torch.randn(2, time_patches * freq_patches, dim)  # the partner's target on its own grid
    y_drop = drop_time_rows(partner_full, nomix, freq_patches)
    target = source_retention_target(y_full, y_drop, nomix, freq_patches)
    for clip in range(2):
        for t in range(time_patches):
            for f in range(freq_patches):
                n = t * freq_patches + f
                if nomix[clip, t]:
                    assert torch.equal(target[clip, n], y_full[clip, n])
                else:
                    torch.testing.assert_close(target[clip, n], 0.5 * (y_full[clip, n] + partner_full[clip, n]))
