"""Pieces of the pre-training job that need no launcher: schedule, DeepSpeed config, dataset check, EMA."""

from __future__ import annotations

import math

import pytest
import torch

from jobs.train.config import ConfigError, load_config
from jobs.train.ema import MasterWeightEMA
from jobs.pretrain import check_dataset
from jobs.train.engine import deepspeed_config, gradient_accumulation, learning_rate, step_seed
from model.sslam import SSLAM


def test_learning_rate_follows_warmup_then_cosine():
    peak, warmup, total = 5e-5, 25000, 200000
    assert learning_rate(0, peak, warmup, total) == 0.0
    assert learning_rate(12500, peak, warmup, total) == pytest.approx(peak / 2)
    assert learning_rate(warmup, peak, warmup, total) == pytest.approx(peak)
    middle = warmup + (total - warmup) // 2
    assert learning_rate(middle, peak, warmup, total) == pytest.approx(peak / 2)
    assert learning_rate(total, peak, warmup, total) == pytest.approx(0.0, abs=1e-15)
    u = warmup + 1000
    expected = 0.5 * peak * (1 + math.cos(math.pi * 1000 / (total - warmup)))
    assert learning_rate(u, peak, warmup, total) == pytest.approx(expected)


def test_deepspeed_config_sets_clipping_precision_and_zero_explicitly():
    config = load_config("base_stage2")
    ds = deepspeed_config(config, world_size=4)
    assert ds["gradient_clipping"] == 4.0  # DeepSpeed >= 0.19.3 would default to 1.0
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["train_micro_batch_size_per_gpu"] == 12
    assert ds["train_batch_size"] == 48 and ds["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("ranks, steps", [(1, 4), (2, 2), (4, 1)])
def test_presets_keep_48_clean_clips_per_update(ranks, steps):
    config = load_config("base_stage1")
    assert gradient_accumulation(config, ranks) == steps
    assert deepspeed_config(config, ranks)["train_batch_size"] == 48


def test_clips_per_update_must_divide():
    config = load_config("base_stage1", ["train.clips_per_update=50"])
    with pytest.raises(ConfigError, match="clips_per_update"):
        gradient_accumulation(config, 2)


def test_check_dataset_names_every_mismatch():
    config = load_config("tiny_stage1", ["train.dataset_fingerprint=abc"])
    good = {"target_length": 512, "mel_bins": 64, "group_size": 3, "r": 7, "fingerprint": "abc"}
    check_dataset(good, config, config.model.time_patches)
    with pytest.raises(ConfigError) as error:
        check_dataset({**good, "mel_bins": 128, "fingerprint": "other"}, config, config.model.time_patches)
    assert "mel_bins: dataset 128 != config 64" in str(error.value)
    assert "fingerprint" in str(error.value)


def test_step_seed_depends_on_every_part():
    seeds = {step_seed(1, u, m, r) for u in range(3) for m in range(2) for r in range(2)}
    assert len(seeds) == 12 and step_seed(1, 2, 1, 0) == step_seed(1, 2, 1, 0)


def test_master_weight_ema_without_partitions_is_the_ema_step():
    cfg = load_config("tiny_stage1").model
    first = SSLAM(cfg)
    with torch.no_grad():
        for a in first.encoder.parameters():
            a.add_(torch.randn_like(a))
    before = {name: p.clone() for name, p in first.teacher.named_parameters()}
    decay = first.ema_decay(7)
    MasterWeightEMA(first.encoder, first.teacher).update(decay)
    student = dict(first.encoder.named_parameters())
    for name, param in first.teacher.named_parameters():
        expected = decay * before[name] + (1 - decay) * student[name].detach()
        torch.testing.assert_close(param, expected, atol=1e-7, rtol=1e-6, msg=name)
        assert param.dtype == torch.float32
    changed = [not torch.equal(a, b) for a, b in zip(first.teacher.parameters(), first.encoder.parameters())]
    assert all(changed)


def test_stage_0_needs_fp32_because_it_has_no_master_copies():
    with pytest.raises(ConfigError, match="zero_stage=0"):
        load_config("tiny_stage1", ["train.zero_stage=0", "train.precision=bf16"])
    load_config("tiny_stage1", ["train.zero_stage=0", "train.precision=fp32"])


def test_master_weight_ema_refuses_low_precision_weights_without_master_copies():
    model = SSLAM(load_config("tiny_stage1").model)
    model.encoder.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="no fp32 master copy"):
        MasterWeightEMA(model.encoder, model.teacher).update(0.9)



def test_aware_padding_refuses_stored_mixtures_whose_padding_overwrote_content():
    aware = load_config("tiny_stage2", ["model.padding=aware", "data.mixing.mix_padding=silence"])
    stored = {"target_length": 512, "mel_bins": 64, "group_size": 3, "r": 7, "materialize_mixtures": True}
    with pytest.raises(ConfigError, match="mix_padding: dataset 'zero'"):
        check_dataset({**stored, "mix_padding": "zero"}, aware, aware.model.time_patches)
    check_dataset({**stored, "mix_padding": "silence"}, aware, aware.model.time_patches)
    check_dataset({**stored, "materialize_mixtures": False, "mix_padding": "zero"}, aware, aware.model.time_patches)
    reference = load_config("tiny_stage2")
    check_dataset({**stored, "mix_padding": "zero"}, reference, reference.model.time_patches)
