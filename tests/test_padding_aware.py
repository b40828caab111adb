"""`model.padding: aware` (model/padding.py): padding tokens are left out of the targets' statistics, the
losses and S, so nothing about the padding changes the loss; `reference` keeps the loss bits of before."""

from __future__ import annotations

import math

import pytest
import torch

from model.masking import content_block_masks
from model.padding import content_tokens, zero_padding
from model.sslam import SSLAM
from model.targets import cls_target, instance_norm_tokens, make_targets, source_retention_target
from tests.test_sslam import group_batch, tiny_config

# Loss, parts, Σ|grad| and S of the unchanged code (commit afd48b7) on `_fixed_run`, as float.hex().
REFERENCE_BITS = {
    1: ("0x1.a8aec20000000p+5", {"eat_patch": "0x1.f0d1f60000000p+2", "eat_cls": "0x1.6a94840000000p+5"},
        "0x1.247163027c04dp+9", 104),
    2: ("0x1.a3927a0000000p+6", {"eat_patch": "0x1.f065c20000000p+2", "mix_patch": "0x1.8875720000000p+2",
                                 "eat_cls": "0x1.6c04c60000000p+6"}, "0x1.288be75c57141p+10", 208),
}


def _model(stage: int, padding: str) -> SSLAM:
    torch.manual_seed(0)
    return SSLAM(tiny_config(stage=stage, padding=padding))


def _run(model: SSLAM, batch: dict[str, torch.Tensor], noise_seed: int | None = 11):
    if noise_seed is not None:
        torch.manual_seed(noise_seed)  # the decoder's mask-token noise
    loss, parts, stats = model(batch, torch.Generator().manual_seed(7))
    model.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return loss.detach(), {k: v.detach() for k, v in parts.items()}, stats, grads


def _short_batch(model: SSLAM, fill: float, partner_tail: bool = False) -> dict[str, torch.Tensor]:
    """Two groups of two; clips 0 and 3 are short (37 and 70 of 128 frames), their padding set to `fill`.
    With partner_tail, the mixtures of short primaries hold a partner's content after the primary's end
    (what a "silence" log-mel mixture holds there)."""
    batch = group_batch(model.cfg, 2, groups=2, seed=3)
    valid = torch.tensor([37, 128, 128, 70])
    frames = torch.arange(model.cfg.target_length)
    padding = (frames[None, :] >= valid[:, None])[:, None, :, None].expand_as(batch["clean"])
    batch["clean"] = batch["clean"].masked_fill(padding, fill)
    mixed_fill = batch["clean"][batch["partner"]] if partner_tail else torch.full_like(batch["mixed"], fill)
    batch["mixed"] = torch.where(padding, mixed_fill, batch["mixed"])
    batch["valid_frames"] = valid
    return batch


@pytest.mark.parametrize("stage", [1, 2])
def test_reference_mode_keeps_the_loss_bits_of_before(stage):
    model = _model(stage, "reference")
    batch = group_batch(model.cfg, 2, groups=2, seed=3)
    batch["valid_frames"] = torch.tensor([37, 128, 128, 70])  # present but ignored in reference mode
    loss, parts, stats, grads = _run(model, batch, noise_seed=None)  # as when the bits were taken
    grad_sum = float(sum(g.double().abs().sum() for g in grads))
    expected_loss, expected_parts, expected_grad, expected_size = REFERENCE_BITS[stage]
    # The bits were taken on one CPU; another CPU's kernels round fp32 differently (seen: 3e-8 relative), so the
    # check is "the same numbers up to fp32 rounding"; any change of the computation moves them far more.
    def close(value: float, bits: str) -> bool:
        return value == pytest.approx(float.fromhex(bits), rel=1e-6)

    assert close(loss.item(), expected_loss)
    assert parts.keys() == expected_parts.keys()
    assert all(close(v.item(), expected_parts[k]) for k, v in parts.items())
    assert close(grad_sum, expected_grad)
    assert stats["sample_size"] == expected_size


@pytest.mark.parametrize("stage", [1, 2])
def test_aware_loss_and_gradients_do_not_see_the_padding(stage):
    model = _model(stage, "aware")
    zero = _run(model, _short_batch(model, 0.0))
    huge = _run(model, _short_batch(model, 1e4, partner_tail=True))
    assert torch.equal(zero[0], huge[0])
    assert all(torch.equal(zero[1][k], huge[1][k]) for k in zero[1])
    assert all(torch.equal(a, b) for a, b in zip(zero[3], huge[3]))
    # The control: in reference mode the same change of padding values moves the loss.
    reference = _model(stage, "reference")
    assert not torch.equal(_run(reference, _short_batch(reference, 0.0))[0],
                           _run(reference, _short_batch(reference, 1e4))[0])


@pytest.mark.parametrize("stage", [1, 2])
def test_aware_sample_size_counts_the_masked_content_tokens(stage):
    model = _model(stage, "aware")
    cfg = model.cfg
    batch = _short_batch(model, 0.0)
    _, _, stats, _ = _run(model, batch)
    content_rows = torch.tensor([3, 8, 8, 5]).repeat_interleave(cfg.clone_batch)
    mask = content_block_masks(content_rows, cfg.time_patches, cfg.freq_patches, cfg, torch.Generator().manual_seed(7))
    content = content_tokens(batch["valid_frames"], cfg.time_patches, cfg.freq_patches, cfg.patch_size)
    expected = int((mask & content.repeat_interleave(cfg.clone_batch, dim=0)).sum())
    assert stats["sample_size"] == expected * (2 if stage == 2 else 1)
    assert stats["sample_size"] < mask.sum() * (2 if stage == 2 else 1)
    # clip 0 has ceil(37 / 16) = 3 of 8 content time rows, clip 3 has 5
    assert content.view(4, cfg.time_patches, cfg.freq_patches)[:, :, 0].sum(1).tolist() == [3, 8, 8, 5]


@pytest.mark.parametrize("stage", [1, 2])
def test_aware_on_full_length_clips_is_the_reference_loss(stage):
    aware, reference = _model(stage, "aware"), _model(stage, "reference")
    batch = group_batch(aware.cfg, 2, groups=2, seed=3)
    batch["valid_frames"] = torch.full((4,), aware.cfg.target_length)
    loss_aware, parts_aware, stats_aware, _ = _run(aware, batch)
    loss_reference, parts_reference, stats_reference, _ = _run(reference, batch)
    assert stats_aware["sample_size"] == stats_reference["sample_size"]
    torch.testing.assert_close(loss_aware, loss_reference, rtol=1e-4, atol=1e-4)


def test_aware_needs_valid_frames_in_range():
    model = _model(1, "aware")
    batch = group_batch(model.cfg, 2, seed=3)
    with pytest.raises(KeyError, match="valid_frames"):
        model(batch)
    for bad in (torch.tensor([0, 128]), torch.tensor([129, 128]), torch.tensor([5.0, 128.0])):
        with pytest.raises(ValueError, match="valid_frames"):
            model({**batch, "valid_frames": bad})


def test_content_instance_norm_and_cls_target_use_content_tokens_only():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 10, 6, generator=generator) * 3 + 1
    content = torch.zeros(2, 10, dtype=torch.bool)
    content[0, :4] = True
    content[1, :] = True
    poisoned = features.clone()
    poisoned[0, 4:] = 1e6
    normed = instance_norm_tokens(poisoned, content)
    torch.testing.assert_close(normed[0, :4], instance_norm_tokens(features[:1, :4])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normed[1], instance_norm_tokens(features[1:])[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(normed[0, 4:], torch.zeros(6, 6))
    targets = make_targets([poisoned, poisoned * 2], 2, content)
    assert torch.equal(targets[0, 4:], torch.zeros(6, 6))
    clean_targets = make_targets([features[:1, :4], features[:1, :4] * 2], 2)
    torch.testing.assert_close(targets[0, :4], clean_targets[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls_target(targets, content)[0], clean_targets[0].mean(0), rtol=1e-5, atol=1e-5)


def test_a_row_of_padding_alone_gives_zeros_not_nan():
    features = torch.randn(1, 4, 3)
    none = torch.zeros(1, 4, dtype=torch.bool)
    assert torch.equal(instance_norm_tokens(features, none), torch.zeros(1, 4, 3))
    assert torch.equal(cls_target(make_targets([features], 1, none), none), torch.zeros(1, 3))


def test_retention_target_keeps_the_primary_where_the_partner_is_padding():
    y_full = torch.full((1, 8, 2), 2.0)
    y_drop = torch.full((1, 6, 2), 4.0)  # Tp = 4, Fp = 2, one no-mix row dropped
    nomix = torch.tensor([[False, True, False, False]])
    partner_content = torch.tensor([[True, True, True, True, True, True, False, False]])
    target = source_retention_target(y_full, y_drop, nomix, 2, partner_content)
    assert target[0, :, 0].tolist() == [3.0, 3.0, 2.0, 2.0, 3.0, 3.0, 2.0, 2.0]
    assert source_retention_target(y_full, y_drop, nomix, 2)[0, :, 0].tolist() == [3, 3, 2, 2, 3, 3, 3, 3]


def test_zero_padding_resets_padding_frames_only():
    fbank = torch.full((2, 1, 6, 3), 5.0)
    out = zero_padding(fbank, torch.tensor([4, 6]))
    assert out[0, 0, :4].eq(5).all() and out[0, 0, 4:].eq(0).all() and out[1].eq(5).all()
    assert fbank.eq(5).all()
    assert math.isfinite(float(out.sum()))
