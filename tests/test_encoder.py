"""Encoder: positional table layout and values, time-major patch embedding, post-norm block against a
hand-written reference, init, state-dict names and the ViT-B parameter count."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ModelConfig
from model.encoder import Block, Encoder, sincos_position_table


def tiny_config(**overrides) -> ModelConfig:
    values = dict(
        target_length=128,
        mel_bins=32,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_dim=32,
        decoder_groups=4,
        decoder_layers=2,
        clone_batch=2,
        max_time_patches=64,
    )
    values.update(overrides)
    return ModelConfig(**values)


def test_position_table_spot_values():
    # dim 8: each half has dim 4 = [sin | cos] over omega = [1, 1/100].
    table = sincos_position_table(time_patches=5, freq_patches=3, dim=8)
    assert table.shape == (1, 15, 8) and table.dtype == torch.float32
    t, f = 3, 2
    expected = torch.tensor(
        [math.sin(f), math.sin(f / 100), math.cos(f), math.cos(f / 100),
         math.sin(t), math.sin(t / 100), math.cos(t), math.cos(t / 100)]
    )
    torch.testing.assert_close(table[0, t * 3 + f], expected, atol=1e-6, rtol=0)


def test_position_table_halves_encode_frequency_then_time():
    dim, freq_patches = 64, 8
    table = sincos_position_table(time_patches=16, freq_patches=freq_patches, dim=dim)[0]
    half = dim // 2
    row0 = table[0]
    # Row 1 = (t=0, f=1): differs from row 0 in the first (frequency) half only.
    assert (table[1, :half] - row0[:half]).abs().max() > 0.1
    assert torch.equal(table[1, half:], row0[half:])
    # Row Fp = (t=1, f=0): differs in the second (time) half only.
    assert torch.equal(table[freq_patches, :half], row0[:half])
    assert (table[freq_patches, half:] - row0[half:]).abs().max() > 0.1
    # Full formula with omega_k = 10000^(-k / (dim/4)).
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    for t, f in [(0, 0), (5, 7), (15, 3)]:
        expected = torch.cat([torch.sin(f * omega), torch.cos(f * omega), torch.sin(t * omega), torch.cos(t * omega)])
        torch.testing.assert_close(table[t * freq_patches + f].double(), expected, atol=1e-5, rtol=0)


def test_pos_embed_is_persistent_nontrainable_buffer():
    encoder = Encoder(tiny_config())
    assert encoder.pos_embed.shape == (1, 64 * 2, 32)
    assert "pos_embed" in encoder.state_dict()
    assert "pos_embed" not in dict(encoder.named_parameters())


def test_state_dict_names():
    encoder = Encoder(tiny_config())
    keys = set(encoder.state_dict())
    expected = {"patch_embed.weight", "patch_embed.bias", "pos_embed", "cls_token", "pre_norm.weight", "pre_norm.bias"}
    for i in range(2):
        for name in ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]:
            expected |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    assert keys == expected
    assert encoder.patch_embed.weight.shape == (32, 1, 16, 16)


def test_normalize_padding_value_base_constants():
    encoder = Encoder(tiny_config())
    padded = encoder.normalize(torch.zeros(1))
    assert padded.item() == pytest.approx(4.268 / 9.138, abs=1e-6)


def test_embed_is_time_major_conv_plus_positions():
    cfg = tiny_config()
    encoder = Encoder(cfg)
    x = torch.randn(2, 1, 64, 32) * 3 - 4  # shorter than target_length: uses the first 4 time rows
    tokens = encoder.embed(x)
    p, tp, fp = 16, 4, 2
    normed = (x - cfg.norm_mean) / (2 * cfg.norm_std)
    patches = normed.reshape(2, tp, p, fp, p).permute(0, 1, 3, 2, 4).reshape(2, tp * fp, p * p)
    weight = encoder.patch_embed.weight.reshape(32, p * p)
    expected = patches @ weight.T + encoder.patch_embed.bias + encoder.pos_embed[:, : tp * fp]
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.embed(x[:, 0]), tokens)


@pytest.mark.parametrize("shape", [(1, 1, 130, 32), (1, 1, 128, 16), (1, 1, 65 * 16, 32), (1, 2, 128, 32)])
def test_embed_rejects_bad_shapes(shape):
    with pytest.raises(ValueError):
        Encoder(tiny_config()).embed(torch.zeros(shape))


def _randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            param.copy_(offset + 0.3 * torch.randn_like(param))


def test_block_matches_hand_written_post_norm():
    torch.manual_seed(0)
    dim, heads, eps = 16, 4, 1e-6
    block = Block(dim, heads, mlp_ratio=4.0, eps=eps)
    _randomize(block)
    h = torch.randn(3, 7, dim)
    out, ffn = block(h)

    def layer_norm(x, norm):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias

    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    head_dim = dim // heads
    outputs = []
    for head in range(heads):
        sl = slice(head * head_dim, (head + 1) * head_dim)
        scores = (q[..., sl] * head_dim**-0.5) @ k[..., sl].transpose(1, 2)
        outputs.append(torch.softmax(scores, dim=-1) @ v[..., sl])
    attn = torch.cat(outputs, dim=-1) @ block.attn.proj.weight.T + block.attn.proj.bias
    u = layer_norm(h + attn, block.norm1)
    hidden = u @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    expected_ffn = hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    expected = layer_norm(u + expected_ffn, block.norm2)
    torch.testing.assert_close(ffn, expected_ffn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_contextualize_prepends_cls_without_position():
    torch.manual_seed(0)
    encoder = Encoder(tiny_config())
    x = torch.randn(2, 1, 128, 32)
    h, ffn = encoder(x)
    assert h.shape == (2, 1 + 16, 32) and len(ffn) == 2 and ffn[0].shape == (2, 17, 32)
    tokens = encoder.embed(x)
    first = torch.cat([encoder.cls_token.expand(2, -1, -1), tokens], dim=1)
    block_out, block_ffn = encoder.blocks[0](encoder.pre_norm(first))
    torch.testing.assert_close(ffn[0], block_ffn)
    torch.testing.assert_close(h, encoder.blocks[1](block_out)[0])
    h_only, none = encoder(x, return_ffn=False)
    assert none == [] and torch.equal(h_only, h)


def test_init():
    torch.manual_seed(0)
    cfg = tiny_config(embed_dim=64, num_heads=4)
    encoder = Encoder(cfg)
    fc1 = encoder.blocks[0].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(fc1.bias) == 0
    assert torch.equal(encoder.pre_norm.weight, torch.ones(64))
    assert torch.count_nonzero(encoder.blocks[1].norm2.bias) == 0
    bound = math.sqrt(6 / (64 + 16 * 16))
    conv = encoder.patch_embed.weight
    assert conv.abs().max() <= bound and conv.abs().max() > 0.95 * bound
    assert encoder.cls_token.std().item() == pytest.approx(1.0, abs=0.35)


def test_base_parameter_count():
    with torch.device("meta"):
        encoder = Encoder(ModelConfig())
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert trainable == 85_254_144
    assert encoder.pos_embed.shape == (1, 6144, 768) and encoder.pos_embed.numel() == 4_718_592
