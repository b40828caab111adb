"""CNN decoder: shapes, residual structure, grid layout and locality, input construction, parameter count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.decoder import CHANNEL_NORM_EPS, Decoder, decoder_input


def tiny_config(**overrides) -> ModelConfig:
    values = dict(
        target_length=256, mel_bins=64, embed_dim=32, depth=2, num_heads=2, decoder_dim=32,
        decoder_groups=4, decoder_layers=2, max_time_patches=64,
    )
    values.update(overrides)
    return ModelConfig(**values)


def test_shapes_and_names():
    decoder = Decoder(tiny_config())
    out = decoder(torch.randn(3, 16 * 4, 32), 16, 4)
    assert out.shape == (3, 64, 32)
    assert decoder.input_proj is None
    assert decoder.layers[0].conv.weight.shape == (32, 8, 3, 3)
    assert set(decoder.state_dict()) == {
        "layers.0.conv.weight", "layers.0.conv.bias", "layers.1.conv.weight", "layers.1.conv.bias",
        "proj.weight", "proj.bias",
    }


def test_input_projection_only_when_dims_differ():
    decoder = Decoder(tiny_config(decoder_dim=16))
    assert decoder.input_proj.weight.shape == (16, 32) and decoder.proj.weight.shape == (32, 16)
    assert decoder(torch.randn(2, 64, 32), 16, 4).shape == (2, 64, 32)


def test_zero_conv_weights_each_layer_adds_gelu_of_normed_bias():
    cfg = tiny_config(decoder_layers=3)
    decoder = Decoder(cfg)
    with torch.no_grad():
        for layer in decoder.layers:
            layer.conv.weight.zero_()
        decoder.proj.weight.copy_(torch.eye(32))
        decoder.proj.bias.zero_()
    tokens = torch.randn(2, 64, 32)
    increment = torch.zeros(32)
    for layer in decoder.layers:
        bias = layer.conv.bias.detach()
        normed = (bias - bias.mean()) / torch.sqrt(bias.var(unbiased=False) + CHANNEL_NORM_EPS)
        increment = increment + F.gelu(normed)
    torch.testing.assert_close(decoder(tokens, 16, 4), tokens + increment, atol=1e-5, rtol=1e-5)


def test_matches_channels_first_reference():
    """The reference layout: (R, N, C) -> (R, C, Tp, Fp); conv, LN over channels, GELU, residual; back; proj."""
    torch.manual_seed(0)
    decoder = Decoder(tiny_config())
    tokens = torch.randn(3, 64, 32)
    x = tokens.transpose(1, 2).reshape(3, 32, 16, 4)
    for layer in decoder.layers:
        y = layer.conv(x)
        y = F.layer_norm(y.transpose(1, 3), (32,), eps=1e-5).transpose(1, 3)
        x = F.gelu(y) + x
    expected = decoder.proj(x.reshape(3, 32, 64).transpose(1, 2))
    torch.testing.assert_close(decoder(tokens, 16, 4), expected, atol=1e-5, rtol=1e-5)


def test_receptive_field_follows_time_major_grid():
    torch.manual_seed(0)
    decoder = Decoder(tiny_config(decoder_layers=1))
    tokens = torch.randn(1, 64, 32)
    changed = tokens.clone()
    t, f = 5, 1
    changed[0, t * 4 + f] += 1.0
    diff = (decoder(changed, 16, 4) - decoder(tokens, 16, 4)).abs().sum(-1).reshape(16, 4)
    touched = torch.nonzero(diff > 1e-6).tolist()
    assert sorted(touched) == [[tt, ff] for tt in (4, 5, 6) for ff in (0, 1, 2)]


def test_decoder_input_places_visible_and_noise():
    torch.manual_seed(0)
    rows, num_patches, dim = 4, 50, 64
    ids_shuffle = torch.stack([torch.randperm(num_patches) for _ in range(rows)])
    ids_restore = ids_shuffle.argsort(1)
    visible = torch.randn(rows, 10, dim) + 5.0
    tokens = decoder_input(visible, ids_restore, noise_std=0.01)
    assert tokens.shape == (rows, num_patches, dim)
    for row in range(rows):
        torch.testing.assert_close(tokens[row, ids_shuffle[row, :10]], visible[row])
    noise = torch.stack([tokens[row, ids_shuffle[row, 10:]] for row in range(rows)])
    assert noise.std().item() == pytest.approx(0.01, rel=0.05)
    assert noise.mean().abs().item() < 1e-3


def test_base_parameter_count():
    with torch.device("meta"):
        decoder = Decoder(ModelConfig())
    assert sum(p.numel() for p in decoder.parameters()) == 2_585_856
    assert decoder.layers[0].conv.weight.shape == (768, 48, 3, 3)
