"""The pieces of fine-tuning that need no launcher (SSLAM_SPEC §11): drop path, layer-wise LR decay groups and
their schedules, batch mixup, SpecAugment, the soft-label loss, the epoch plan, sample weights, presets."""

from __future__ import annotations

import math

import pytest
import torch

from jobs.train.config import ConfigError, load_config
from jobs.train.finetune_data import EpochPlan, read_sample_weights
from model.augment import batch_mixup, mask_ranges, spec_augment
from model.config import ModelConfig
from model.encoder import Encoder
from model.finetune import (
    Augmentation, FinetuneModel, group_learning_rate, layer_decay_groups, layer_scale, set_drop_path, soft_label_bce,
)

TINY = dict(embed_dim=32, depth=4, num_heads=2, decoder_dim=32, decoder_groups=4, target_length=64, mel_bins=32,
            max_time_patches=8)


def tiny_model(classes: int = 5) -> FinetuneModel:
    torch.manual_seed(0)
    return FinetuneModel(Encoder(ModelConfig(**TINY)), classes, Augmentation())


def test_drop_path_rates_follow_linspace_and_rate_zero_changes_nothing():
    model = tiny_model()
    assert set_drop_path(model.encoder, 0.3) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x = torch.randn(6, 1, 64, 32)
    model.eval()
    reference = model.logits(x)
    model.train()
    torch.manual_seed(1)
    dropped = model.logits(x)
    assert not torch.allclose(dropped, reference)  # training mode drops branches
    set_drop_path(model.encoder, 0.0)
    assert torch.equal(model.logits(x), reference)  # rate 0 in training == eval: pre-training is unchanged


def test_layer_decay_gives_block_i_decay_to_the_depth_minus_i():
    assert layer_scale("encoder.blocks.0.attn.qkv.weight", 12, 0.65) == pytest.approx(0.65**12)
    assert layer_scale("encoder.blocks.11.mlp.fc1.bias", 12, 0.65) == pytest.approx(0.65)
    for other in ("encoder.patch_embed.weight", "encoder.cls_token", "encoder.pre_norm.weight",
                  "classifier.head.weight", "classifier.fc_norm.bias"):
        assert layer_scale(other, 12, 0.65) == 1.0
    model = tiny_model()
    groups = layer_decay_groups(model, 1e-3, 0.05, 0.5, depth=4)
    assert [g["lr_scale"] for g in groups] == pytest.approx([0.5**4, 0.5**3, 0.5**2, 0.5, 1.0])
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * g["lr_scale"] for g in groups])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.05 for g in groups)  # the reference's effective wd on everything
    exempt = layer_decay_groups(model, 1e-3, 0.05, 0.5, depth=4, mode="exclude_norm_bias")
    assert {g["weight_decay"] for g in exempt} == {0.0, 0.05}


def test_group_schedules_warm_up_decay_to_min_lr_and_low_peaks_stay_constant():
    peak, floor, warmup, total = 5e-5, 1e-6, 4000, 40000
    assert group_learning_rate(0, peak, floor, warmup, total) == pytest.approx(floor)
    assert group_learning_rate(warmup, peak, floor, warmup, total) == pytest.approx(peak)
    assert group_learning_rate(total, peak, floor, warmup, total) == pytest.approx(floor)
    middle = (warmup + total) // 2
    assert group_learning_rate(middle, peak, floor, warmup, total) == pytest.approx((peak + floor) / 2)
    # Blocks 0, 1, 2 of 12 at 5e-5: scaled peaks below 1e-6, constant (SPEC §11); block 3 is not.
    for block in range(12):
        scaled = peak * 0.65 ** (12 - block)
        values = {group_learning_rate(u, scaled, floor, warmup, total) for u in (0, 100, warmup, middle, total)}
        assert (len(values) == 1) == (block <= 2), block


def test_mixup_mixes_inputs_and_labels_with_one_lambda_and_the_batch_reversal():
    x, labels = torch.randn(4, 1, 8, 6), torch.eye(4)
    mixed, mixed_labels, lam = batch_mixup(x, labels, 0.8, 1.0, torch.Generator().manual_seed(3))
    assert 0.0 < lam < 1.0
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0))
    assert torch.allclose(mixed_labels, lam * labels + (1 - lam) * labels.flip(0))
    assert torch.allclose(mixed_labels.sum(), labels.sum())  # label mass is kept
    same, same_labels, one = batch_mixup(x, labels, 0.8, 0.0, torch.Generator().manual_seed(3))
    assert one == 1.0 and same is x and same_labels is labels
    applied = sum(batch_mixup(x, labels, 0.8, 0.9, torch.Generator().manual_seed(s))[2] != 1.0 for s in range(400))
    assert 0.85 * 400 < applied < 0.95 * 400


def test_spec_augment_masks_one_band_and_one_span_per_example_independently():
    x = torch.randn(64, 1, 100, 40) + 5.0
    out = spec_augment(x, 0.2 * 40, 0.2 * 100, torch.Generator().manual_seed(0))
    masked = out == 0
    widths_f, widths_t = [], []
    for example in masked[:, 0]:
        full_rows = example.all(dim=1)  # masked time frames
        full_cols = example.all(dim=0)  # masked mel bins
        widths_t.append(int(full_rows.sum()))
        widths_f.append(int(full_cols.sum()))
        for flags in (full_rows, full_cols):
            where = flags.nonzero().flatten()
            if where.numel():
                assert where[-1] - where[0] + 1 == where.numel()  # one contiguous range
        # Every masked cell lies in the band or the span.
        assert torch.equal(example, full_rows[:, None] | full_cols[None, :])
    assert max(widths_f) <= 8 and max(widths_t) <= 20
    assert len(set(zip(widths_f, widths_t))) > 10  # drawn per example
    assert torch.equal(out[~masked], x[~masked])
    ranges = mask_ranges(128, 25.6, 10000, torch.Generator().manual_seed(1))
    assert int(ranges[:, 0].min()) >= 0 and int(ranges[:, 1].max()) <= 128
    assert float((ranges[:, 1] - ranges[:, 0]).float().mean()) == pytest.approx(12.3, abs=0.6)  # E[floor(U(0,25.6))]


def test_loss_is_summed_bce_over_the_label_mass():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]])
    labels = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.5, 0.0]])
    terms = -(labels * torch.log(torch.sigmoid(logits)) + (1 - labels) * torch.log(1 - torch.sigmoid(logits)))
    assert float(soft_label_bce(logits, labels)) == pytest.approx(float(terms.sum() / 2.0), rel=1e-6)


def test_epoch_plan_covers_each_clip_once_per_epoch_and_splits_ranks():
    plan = EpochPlan(num_clips=50, clips_per_update=12, micro_batch=3, world_size=2, seed=7)
    assert plan.updates_per_epoch == 4
    seen = []
    for update in range(4):
        rows = [plan.rows(update, m, r) for m in range(2) for r in range(2)]
        seen += torch.cat(rows).tolist()
    assert len(seen) == len(set(seen)) == 48
    again = EpochPlan(num_clips=50, clips_per_update=12, micro_batch=3, world_size=2, seed=7)
    assert torch.equal(again.rows(6, 1, 1), plan.rows(6, 1, 1))  # a function of (seed, update): resume replays it
    assert not torch.equal(plan.order(0), plan.order(1))


def test_weighted_sampling_draws_without_replacement_by_weight():
    weights = torch.tensor([0.0] * 10 + [1.0] * 30 + [50.0] * 10, dtype=torch.float64)
    plan = EpochPlan(50, 4, 4, 1, seed=0, weights=weights, clips_per_epoch=20)
    assert plan.updates_per_epoch == 5
    counts = torch.zeros(50)
    for epoch in range(30):
        order = plan.order(epoch)
        assert len(order) == 20 and len(set(order.tolist())) == 20
        counts[order] += 1
    assert counts[:10].sum() == 0  # weight 0: never drawn
    assert bool((counts[40:] == 30).all())  # 50x the weight: drawn (almost surely) every epoch
    assert float(counts[10:40].mean()) == 10.0  # the other 10 draws of each epoch spread over the light clips
    assert float(counts[10:40].std()) > 0
    with pytest.raises(ConfigError, match="exceeds"):
        EpochPlan(50, 4, 4, 1, seed=0, weights=weights, clips_per_epoch=45)


def test_sample_weights_by_line_or_by_key_and_hostile_files(tmp_path):
    keys = ["a", "b", "c"]
    lines = tmp_path / "lines.csv"
    lines.write_text("1.0\n2\n0.5\n")
    assert read_sample_weights(lines, keys).tolist() == [1.0, 2.0, 0.5]
    keyed = tmp_path / "keyed.csv"
    keyed.write_text("c,3\na,1\nb,2\n")
    assert read_sample_weights(keyed, keys).tolist() == [1.0, 2.0, 3.0]
    for text, message in [("1\n2\n", "2 weights for 3 clips"), ("1\nx\n2\n", "not a number"),
                          ("1\n-1\n2\n", ">= 0"), ("0\n0\n0\n", "not all 0"), ("a,1\nb,2\n", "no weight"),
                          ("1\nnan\n1\n", "finite")]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_sample_weights(bad, keys)
    with pytest.raises(ConfigError, match="cannot read"):
        read_sample_weights(tmp_path / "missing.csv", keys)


def test_presets_carry_the_papers_numbers():
    as20k, as2m = load_config("finetune_as20k"), load_config("finetune_as2m")
    for config in (as20k, as2m):
        ft, train = config.finetune, config.train
        assert (train.peak_lr, train.betas, train.weight_decay) == (5e-5, [0.9, 0.95], 0.05)
        assert (ft.layer_decay, ft.drop_path_rate, ft.min_lr) == (0.65, 0.1, 1e-6)
        assert (ft.mixup_alpha, ft.mixup_prob, ft.mask_ratio) == (0.8, 0.9, 0.2)
    assert (as20k.data.loader.micro_batch_clips, as20k.train.warmup_updates, as20k.train.max_updates) == (48, 4000, 40000)
    assert (as2m.data.loader.micro_batch_clips, as2m.train.warmup_updates, as2m.train.max_updates) == (96, 30000, 300000)
    assert as20k.finetune.sampling == "permutation"
    assert (as2m.finetune.sampling, as2m.finetune.clips_per_epoch) == ("weighted", 200000)
    assert math.isclose(load_config("tiny_finetune").finetune.layer_decay, 0.65)
