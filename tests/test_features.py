"""Frozen feature extraction: shapes and pooling, clip lengths, padding/cropping, eval/no-grad
behaviour, per-layer outputs and the classifier head (SSLAM_SPEC §11)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.encoder import Encoder
from model.features import (
    ClassifierHead,
    EncoderWithHead,
    extract_features,
    fit_to_encoder,
    frames_grid,
    pad_or_crop_frames,
)

CFG = ModelConfig(embed_dim=32, depth=2, num_heads=2, mel_bins=32, target_length=64, max_time_patches=8,
                  decoder_dim=32, decoder_groups=4, decoder_layers=2)


@pytest.fixture
def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(CFG).train()  # features must switch to eval themselves


def fbank(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return CFG.norm_mean + CFG.norm_std * torch.randn(batch, 1, frames, CFG.mel_bins, generator=gen)


def test_shapes_and_cls_pooling(encoder):
    x = fbank(3, CFG.target_length)
    features = extract_features(encoder, x, layers="all")
    tokens = CFG.time_patches * CFG.freq_patches
    assert features["utterance"].shape == (3, CFG.embed_dim)
    assert features["frames"].shape == (3, tokens, CFG.embed_dim)
    assert len(features["layers"]) == CFG.depth
    assert all(layer.shape == (3, 1 + tokens, CFG.embed_dim) for layer in features["layers"])
    last = features["layers"][-1]
    assert torch.equal(features["utterance"], last[:, 0]) and torch.equal(features["frames"], last[:, 1:])
    assert not torch.equal(features["layers"][0], last)
    # No extra norm: the output is the last block's LN2 output (affine 1/0 at init -> unit variance per token).
    torch.testing.assert_close(last.var(dim=-1, unbiased=False), torch.ones(3, 1 + tokens), atol=1e-3, rtol=0)
    assert frames_grid(features["frames"], CFG.freq_patches).shape == (3, CFG.time_patches, CFG.freq_patches, 32)
    assert "layers" not in extract_features(encoder, x)


def test_mean_pooling_averages_patch_tokens(encoder):
    x = fbank(2, CFG.target_length)
    features = extract_features(encoder, x, pooling="mean")
    torch.testing.assert_close(features["utterance"], features["frames"].mean(dim=1))
    with pytest.raises(ValueError, match="pooling"):
        extract_features(encoder, x, pooling="max")


def test_eval_mode_no_grad_and_mode_restored(encoder):
    x = fbank(1, CFG.target_length)
    features = extract_features(encoder, x)
    assert encoder.training
    assert not features["utterance"].requires_grad
    assert features["utterance"].dtype == torch.float32


def test_three_dim_input_and_batch_independence(encoder):
    x = fbank(3, CFG.target_length)
    batched = extract_features(encoder, x)["frames"]
    torch.testing.assert_close(extract_features(encoder, x[:, 0])["frames"], batched)
    alone = extract_features(encoder, x[1:2])["frames"]
    torch.testing.assert_close(alone, batched[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frames", [CFG.patch_size, 2 * CFG.target_length])
def test_shorter_and_longer_than_training_length(encoder, frames):
    features = extract_features(encoder, fbank(2, frames))
    assert features["frames"].shape == (2, frames // CFG.patch_size * CFG.freq_patches, CFG.embed_dim)


def test_length_errors_name_the_fix(encoder):
    with pytest.raises(ValueError, match="fit_to_encoder"):
        extract_features(encoder, fbank(1, CFG.target_length + 3))
    with pytest.raises(ValueError, match="positional table"):
        extract_features(encoder, fbank(1, (CFG.max_time_patches + 1) * CFG.patch_size))


def test_pad_or_crop_frames():
    x = fbank(2, 40)
    padded = pad_or_crop_frames(x, 16)
    assert padded.shape == (2, 1, 48, CFG.mel_bins)
    assert torch.equal(padded[..., :40, :], x) and torch.equal(padded[..., 40:, :], torch.zeros(2, 1, 8, CFG.mel_bins))
    assert pad_or_crop_frames(x[:, :, :32], 16).shape[-2] == 32
    cropped = pad_or_crop_frames(fbank(1, 200), 16, max_frames=130)
    assert cropped.shape[-2] == 128 and torch.equal(cropped, fbank(1, 200)[..., :128, :])
    with pytest.raises(ValueError, match="no whole patch"):
        pad_or_crop_frames(x, 16, max_frames=10)


def test_fit_to_encoder_makes_any_length_work(encoder):
    for frames in (5, 70, 1000):
        fitted = fit_to_encoder(fbank(1, frames), encoder)
        assert fitted.shape[-2] % CFG.patch_size == 0
        assert fitted.shape[-2] <= CFG.max_time_patches * CFG.patch_size
        extract_features(encoder, fitted)
    # Padding equals the reference: zero raw log-mel frames appended before normalisation.
    short = fbank(1, 50)
    manual = torch.cat([short, torch.zeros(1, 1, 14, CFG.mel_bins)], dim=2)
    torch.testing.assert_close(extract_features(encoder, fit_to_encoder(short, encoder))["utterance"],
                               extract_features(encoder, manual)["utterance"], atol=0, rtol=0)


def test_classifier_head(encoder):
    torch.manual_seed(1)
    head = ClassifierHead(CFG.embed_dim, 7)
    assert head.head.weight.abs().max() <= 2.0 and torch.equal(head.head.bias, torch.zeros(7))
    assert set(head.state_dict()) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    classifier = EncoderWithHead(encoder, head).eval()
    x = fbank(4, CFG.target_length)
    logits = classifier(x)
    assert logits.shape == (4, 7)
    cls = extract_features(encoder, x)["utterance"]
    expected = F.linear(F.layer_norm(cls, (CFG.embed_dim,), head.fc_norm.weight, head.fc_norm.bias, 1e-6),
                        head.head.weight, head.head.bias)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    mean_logits = EncoderWithHead(encoder, head, pooling="mean").eval()(x)
    assert not torch.allclose(mean_logits, logits)
