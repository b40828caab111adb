"""SSLAM model: teacher handling and EMA, losses against a direct per-row re-computation from the
definitions (stage 1 and stage 2 with mixture groups), gradient units, overfitting, parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from jobs.train.ema import MasterWeightEMA
from model.config import ModelConfig
from model.masking import block_masks
from model.sslam import SSLAM
from model.targets import make_targets


def tiny_config(**overrides) -> ModelConfig:
    values = dict(
        target_length=128, mel_bins=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, decoder_dim=32,
        decoder_groups=4, decoder_layers=2, clone_batch=2, max_time_patches=64,
    )
    values.update(overrides)
    return ModelConfig(**values)


def raw_fbank(num_clips: int, cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_clips, 1, cfg.target_length, cfg.mel_bins, generator=generator) * 3 - 4


def group_batch(cfg: ModelConfig, group_size: int, groups: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mixture groups as in DESIGN.md: mixture i puts clip (i - 1) mod G (within its group) into clip i;
    two random non-overlapping no-mix windows of r rows per mixture; log-mel max mixing."""
    generator = torch.Generator().manual_seed(seed)
    num_clips = group_size * groups
    time_patches, patch = cfg.time_patches, cfg.patch_size
    r = max(1, math.floor(15 * time_patches / 64))
    clean = raw_fbank(num_clips, cfg, seed)
    partner = torch.tensor([g * group_size + (i - 1) % group_size for g in range(groups) for i in range(group_size)])
    nomix = torch.zeros(num_clips, time_patches, dtype=torch.bool)
    for i in range(num_clips):
        i1 = int(torch.randint(0, time_patches // 2, (), generator=generator))
        i2 = int(torch.randint(i1 + r, time_patches - r, (), generator=generator))
        nomix[i, i1 : i1 + r] = True
        nomix[i, i2 : i2 + r] = True
    foreign = clean[partner].clone()
    frames = nomix.repeat_interleave(patch, dim=1)[:, None, :, None].expand_as(foreign)
    foreign[frames] = -math.inf
    return {"clean": clean, "mixed": torch.maximum(clean, foreign), "partner": partner, "nomix": nomix}


def loss_of(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((values - targets) ** 2).sum(-1) / math.sqrt(values.shape[-1])


def student_rows(model: SSLAM, clips: torch.Tensor, mask: torch.Tensor):
    """Per row, by hand: visible tokens of clip r // K, encoder, zero mask tokens (noise std 0), decoder."""
    cfg = model.cfg
    tokens = model.encoder.embed(clips)
    predictions, cls_outputs = [], []
    for row in range(mask.shape[0]):
        visible = tokens[row // cfg.clone_batch][~mask[row]]
        hidden, _ = model.encoder.contextualize(visible[None], return_ffn=False)
        grid = torch.zeros(mask.shape[1], cfg.embed_dim).masked_scatter((~mask[row])[:, None], hidden[0, 1:])
        predictions.append(model.decoder(grid[None], cfg.time_patches, cfg.freq_patches)[0])
        cls_outputs.append(hidden[0, 0])
    return predictions, cls_outputs


def reference_stage1(model: SSLAM, clean: torch.Tensor, mask: torch.Tensor):
    cfg = model.cfg
    predictions, cls_outputs = student_rows(model, clean, mask)
    with torch.no_grad():
        _, ffn = model.teacher(clean)
        targets = make_targets([f[:, 1:] for f in ffn], cfg.depth)
    K = cfg.clone_batch
    patch = sum(loss_of(p[m], targets[r // K][m]).sum() for r, (p, m) in enumerate(zip(predictions, mask)))
    cls = sum(loss_of(c, targets[r // K].mean(0)) for r, c in enumerate(cls_outputs))
    return patch, cls


def reference_stage2(model: SSLAM, batch: dict[str, torch.Tensor], mask: torch.Tensor):
    cfg = model.cfg
    K, Fp = cfg.clone_batch, cfg.freq_patches
    clean, nomix, partner = batch["clean"], batch["nomix"], batch["partner"]
    num_clips = clean.shape[0]
    clips = torch.cat([clean, batch["mixed"]])
    predictions, cls_outputs = student_rows(model, clips, torch.cat([mask, mask]))
    with torch.no_grad():
        _, ffn = model.teacher(clips)
        ffn = [f[:, 1:] for f in ffn]
        targets = make_targets(ffn, cfg.depth)
        utterance = make_targets(ffn[-1:], 1).mean(1)
        retention = targets[:num_clips].clone()
        for i in range(num_clips):
            embedded = model.teacher.embed(clean[partner[i]][None])[0].reshape(cfg.time_patches, Fp, -1)
            kept = [t for t in range(cfg.time_patches) if not nomix[i, t]]
            _, partner_ffn = model.teacher.contextualize(embedded[kept].reshape(len(kept) * Fp, -1)[None])
            dropped = make_targets([f[:, 1:] for f in partner_ffn], cfg.depth)[0].reshape(len(kept), Fp, -1)
            for position, t in enumerate(kept):
                rows = slice(t * Fp, (t + 1) * Fp)
                retention[i, rows] = 0.5 * (targets[i, rows] + dropped[position])
    rows = len(predictions)
    eat_patch = sum(loss_of(predictions[r][m], targets[r // K][m]).sum() for r, m in enumerate(torch.cat([mask, mask])))
    mix_patch = sum(
        loss_of(predictions[rows // 2 + r][m], retention[r // K][m]).sum() for r, m in enumerate(mask)
    )
    cls = sum(loss_of(c, utterance[r // K]) for r, c in enumerate(cls_outputs))
    return eat_patch, mix_patch, cls


def student_grads(model: SSLAM) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Teacher and EMA
# --------------------------------------------------------------------------------------------------


def test_ema_decay_schedule_base_values():
    model = SSLAM(tiny_config())
    assert model.ema_decay(0) == pytest.approx(0.9998, abs=1e-12)
    assert model.ema_decay(50_000) == pytest.approx(0.999895, abs=1e-12)
    assert model.ema_decay(100_000) == pytest.approx(0.99999, abs=1e-12)
    assert model.ema_decay(200_000) == pytest.approx(0.99999, abs=1e-12)


def test_teacher_is_separate_fp32_copy():
    model = SSLAM(tiny_config())
    assert [name for name, _ in model.named_children()] == ["encoder", "decoder"]
    assert all(key.startswith(("encoder.", "decoder.")) for key in model.state_dict())
    teacher_state = model.teacher.state_dict()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(teacher_state[key], value)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert not model.teacher.training
    model.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())
    model.teacher_to("cpu")
    assert model.teacher is model.__dict__["_teacher"]


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def test_stage1_losses_and_gradient_match_definitions():
    torch.manual_seed(0)
    cfg = tiny_config(mask_noise_std=0.0)
    model = SSLAM(cfg)
    clean = raw_fbank(3, cfg)
    loss, parts, stats = model({"clean": clean}, torch.Generator().manual_seed(11))
    grid = (cfg.time_patches, cfg.freq_patches)
    mask = block_masks(3 * cfg.clone_batch, *grid, cfg, torch.Generator().manual_seed(11))
    sample_size = int(mask.sum())
    assert stats["sample_size"] == sample_size == 3 * 2 * (16 - 3)
    assert stats["masked_pct"] == pytest.approx(1 - 3 / 16)
    patch, cls = reference_stage1(model, clean, mask)
    torch.testing.assert_close(parts["eat_patch"], (patch / sample_size).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["eat_cls"], cls.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.detach(), parts["eat_patch"] + parts["eat_cls"])

    loss.backward()
    grads = student_grads(model)
    model.zero_grad()
    ((patch + sample_size * cls) / sample_size).backward()  # ∇(Σ raw) / S
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("group_size", [2, 3])
def test_stage2_losses_and_gradient_match_definitions(group_size):
    torch.manual_seed(0)
    cfg = tiny_config(stage=2, mask_noise_std=0.0)
    model = SSLAM(cfg)
    batch = group_batch(cfg, group_size, seed=group_size)
    loss, parts, stats = model(batch, torch.Generator().manual_seed(5))
    grid = (cfg.time_patches, cfg.freq_patches)
    mask = block_masks(group_size * cfg.clone_batch, *grid, cfg, torch.Generator().manual_seed(5))
    sample_size = 2 * int(mask.sum())
    assert stats["sample_size"] == sample_size
    eat_patch, mix_patch, cls = reference_stage2(model, batch, mask)
    torch.testing.assert_close(parts["eat_patch"], (eat_patch / sample_size).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["mix_patch"], (2.0 * mix_patch / sample_size).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["eat_cls"], cls.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.detach(), sum(parts.values()))

    loss.backward()
    grads = student_grads(model)
    model.zero_grad()
    raw_total = eat_patch + 2.0 * mix_patch + sample_size * cls
    (raw_total / sample_size).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gradients_reach_only_the_student():
    cfg = tiny_config(stage=2)
    model = SSLAM(cfg)
    batch = group_batch(cfg, 3, groups=2)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    loss, _, _ = model(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())
    assert all(p.grad is not None for p in model.parameters())
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0 and model.decoder.proj.weight.grad.abs().sum() > 0


def test_stage2_batch_validation():
    cfg = tiny_config(stage=2)
    model = SSLAM(cfg)
    batch = group_batch(cfg, 3)
    with pytest.raises(KeyError):
        model({"clean": batch["clean"]})
    with pytest.raises(ValueError):
        model({**batch, "partner": torch.tensor([1, 2, 3])})
    with pytest.raises(ValueError):
        model({**batch, "nomix": batch["nomix"][:, :-1]})


def test_runs_under_bf16_autocast_with_fp32_teacher():
    cfg = tiny_config(stage=2)
    model = SSLAM(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts, stats = model(group_batch(cfg, 3))
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())


def _overfit(stage: int, steps: int = 200) -> tuple[float, float, dict]:
    torch.manual_seed(0)
    cfg = tiny_config(stage=stage)
    model = SSLAM(cfg)
    batch = group_batch(cfg, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first_parts = None
    ema = MasterWeightEMA(model.encoder, model.teacher)
    for update in range(steps):
        if update:
            ema.update(model.ema_decay(update))
        loss, parts, _ = model(batch, torch.Generator().manual_seed(0))
        if update == 0:
            first, first_parts = loss.item(), parts
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return first, loss.item(), {k: (first_parts[k].item(), v.item()) for k, v in parts.items()}


@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_model_overfits_fixed_batch(stage):
    first, last, parts = _overfit(stage)
    assert last < first / 5
    start, end = parts["eat_patch"]
    assert end < start / 5
    if stage == 2:
        start, end = parts["mix_patch"]
        assert end < start / 5


# --------------------------------------------------------------------------------------------------
# Optimizer groups and size
# --------------------------------------------------------------------------------------------------


def test_param_groups():
    model = SSLAM(tiny_config())
    total = sum(1 for p in model.parameters() if p.requires_grad)
    (single,) = model.param_groups(0.05, "all")
    assert single["weight_decay"] == 0.05 and len(single["params"]) == total
    decayed, exempt = model.param_groups(0.05, "exclude_norm_bias")
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    assert len(decayed["params"]) + len(exempt["params"]) == total
    assert all(p.ndim == 1 for p in exempt["params"])
    assert any(p is model.encoder.cls_token for p in decayed["params"])
    with pytest.raises(ValueError):
        model.param_groups(0.05, "none")


def test_base_model_sizes():
    with torch.device("meta"):
        model = SSLAM(ModelConfig())
    encoder = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert (encoder, decoder) == (85_254_144, 2_585_856)
    assert model.encoder.pos_embed.numel() == 4_718_592
    assert sum(p.numel() for p in model.teacher.parameters()) == encoder
