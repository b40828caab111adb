"""Official EAT/SSLAM checkpoint import (SSLAM_SPEC §12), our safetensors files, and stage-2 loading.

The official files are synthesised here with torch.save in fairseq's top-level layout: fp16 `model`
tensors, an fp32 nested `_ema` dict, a plain `cfg` dict and numpy scalars in `extra_state` and
`optimizer_history`. The forward used to check imported weights is re-implemented in this file from
the raw tensors (explicit conv, matmuls, softmax, LayerNorms).
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.build import build_classifier, build_encoder
from model.checkpoint import (
    CheckpointError,
    load_encoder_safetensors,
    load_into_sslam,
    load_sslam_weights,
    load_weights,
    read_config,
    save_encoder_safetensors,
    save_sslam_weights,
    save_weights,
)
from model.config import ModelConfig
from model.features import extract_features
from model.official import convert_official, import_official
from model.sslam import SSLAM

IMAGE = "modality_encoders.IMAGE."

# Small model: D=32, 2 blocks, 2 heads, 16x16 patches, 32 mel bins (Fp=2), table of 8 time patches.
DIM, DEPTH, HEADS, PATCH, MEL, TABLE_TIME, TARGET = 32, 2, 2, 16, 32, 8, 64
DEC_LAYERS, DEC_GROUPS, DEC_KERNEL = 2, 4, 3
NUM_CLASSES = 5
MEAN, STD = -4.268, 4.569


def sincos_table(time_patches: int, freq_patches: int, dim: int) -> torch.Tensor:
    """SSLAM_SPEC §2 written out: row t*Fp+f = [sin(f w) | cos(f w) | sin(t w) | cos(t w)], w_k = 10000^(-k/(D/4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float32) / np.float32(quarter))
    rows = []
    for t in range(time_patches):
        for f in range(freq_patches):
            rows.append(np.concatenate([np.sin(f * omega), np.cos(f * omega), np.sin(t * omega), np.cos(t * omega)]))
    return torch.from_numpy(np.stack(rows).astype(np.float32)).unsqueeze(0)


def encoder_tensors(gen: torch.Generator, dim: int, depth: int, patch: int, rows: int, freq: int, dtype) -> dict:
    def rand(*shape, scale=0.05, offset=0.0):
        return (offset + scale * torch.randn(*shape, generator=gen)).to(dtype)

    state = {
        IMAGE + "extra_tokens": rand(1, 1, dim, scale=1.0),
        IMAGE + "local_encoder.proj.weight": rand(dim, 1, patch, patch),
        IMAGE + "local_encoder.proj.bias": rand(dim),
        IMAGE + "fixed_positional_encoder.positions": sincos_table(rows, freq, dim).to(dtype),
        IMAGE + "context_encoder.norm.weight": rand(dim, scale=0.1, offset=1.0),
        IMAGE + "context_encoder.norm.bias": rand(dim),
    }
    for i in range(depth):
        block = f"blocks.{i}."
        state.update(
            {
                block + "norm1.weight": rand(dim, scale=0.1, offset=1.0),
                block + "norm1.bias": rand(dim),
                block + "attn.qkv.weight": rand(3 * dim, dim, scale=0.2),
                block + "attn.qkv.bias": rand(3 * dim),
                block + "attn.proj.weight": rand(dim, dim, scale=0.2),
                block + "attn.proj.bias": rand(dim),
                block + "norm2.weight": rand(dim, scale=0.1, offset=1.0),
                block + "norm2.bias": rand(dim),
                block + "mlp.fc1.weight": rand(4 * dim, dim, scale=0.2),
                block + "mlp.fc1.bias": rand(4 * dim),
                block + "mlp.fc2.weight": rand(dim, 4 * dim, scale=0.2),
                block + "mlp.fc2.bias": rand(dim),
            }
        )
    return state


def decoder_tensors(gen: torch.Generator, dim: int, layers: int, groups: int, kernel: int, dtype) -> dict:
    state = {}
    for j in range(layers):
        weight = 0.05 * torch.randn(dim, dim // groups, kernel, kernel, generator=gen)
        state[f"{IMAGE}decoder.blocks.{j}.0.weight"] = weight.to(dtype)
        state[f"{IMAGE}decoder.blocks.{j}.0.bias"] = (0.05 * torch.randn(dim, generator=gen)).to(dtype)
    state[IMAGE + "decoder.proj.weight"] = (0.05 * torch.randn(dim, dim, generator=gen)).to(dtype)
    state[IMAGE + "decoder.proj.bias"] = (0.05 * torch.randn(dim, generator=gen)).to(dtype)
    return state


def fairseq_model_cfg(with_heads: bool = True) -> dict:
    cfg = {
        "_name": "data2vec_multi",
        "depth": DEPTH,
        "embed_dim": DIM,
        "norm_eps": 1e-6,
        "clone_batch": 16,
        "average_top_k_layers": DEPTH,
        "ema_decay": 0.9998,
        "ema_end_decay": 0.99999,
        "ema_anneal_end_step": 100000,
        "cls_loss": 1,
        "supported_modality": "IMAGE",
        "modalities": {
            "image": {
                "patch_size": PATCH,
                "in_chans": 1,
                "mask_prob": 0.8,
                "mask_prob_adjust": 0.07,
                "mask_length": 5,
                "mask_noise_std": 0.01,
                "target_length": TARGET,
                "decoder": {"decoder_dim": DIM, "decoder_groups": DEC_GROUPS, "decoder_kernel": DEC_KERNEL,
                            "decoder_layers": DEC_LAYERS},
            }
        },
    }
    if with_heads:
        cfg["num_heads"] = HEADS
    return cfg


def fairseq_trainer_state(num_updates: int) -> dict:
    """The non-model top-level entries, with the numpy values fairseq pickles."""
    return {
        "args": None,
        "criterion": {},
        "optimizer_history": [
            {
                "criterion_name": "ModelCriterion",
                "optimizer_name": "FP16Optimizer",
                "lr_scheduler_state": {"best": np.float64(1.0)},
                "num_updates": num_updates,
            }
        ],
        "task_state": {},
        "extra_state": {
            "metrics": {"train": {"loss": {"val": np.float64(1.0), "count": np.int64(3)}}},
            "previous_training_time": np.float64(12.5),
            "train_iterator": {"epoch": np.int64(3), "iterations_in_epoch": 7, "shuffle": True},
            "best_loss": np.zeros(2, dtype=np.float32),
        },
        "last_optimizer_state": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                                 "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.95), "params": [0]}]},
    }


def pretrain_checkpoint(seed: int = 0, with_heads: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    freq = MEL // PATCH
    model = encoder_tensors(gen, DIM, DEPTH, PATCH, TABLE_TIME, freq, torch.float16)
    model.update(decoder_tensors(gen, DIM, DEC_LAYERS, DEC_GROUPS, DEC_KERNEL, torch.float16))
    model["_ema"] = encoder_tensors(gen, DIM, DEPTH, PATCH, TABLE_TIME, freq, torch.float32)
    # fairseq's EMA copies the positional table; keep it the fp16-rounded one, as in real files.
    table = IMAGE + "fixed_positional_encoder.positions"
    model["_ema"][table] = model[table].float()
    cfg = {"common": {"fp16": True, "seed": 1}, "model": fairseq_model_cfg(with_heads),
           "task": {"_name": "mae_image_pretraining", "target_length": TARGET}}
    return {"cfg": cfg, "model": model, **fairseq_trainer_state(1234)}


def finetune_checkpoint(seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    encoder = encoder_tensors(gen, DIM, DEPTH, PATCH, TABLE_TIME, MEL // PATCH, torch.float16)
    model = {f"model.{key}": value for key, value in encoder.items()}
    model["fc_norm.weight"] = (1 + 0.1 * torch.randn(DIM, generator=gen)).half()
    model["fc_norm.bias"] = (0.1 * torch.randn(DIM, generator=gen)).half()
    model["head.weight"] = (0.1 * torch.randn(NUM_CLASSES, DIM, generator=gen)).half()
    model["head.bias"] = (0.1 * torch.randn(NUM_CLASSES, generator=gen)).half()
    cfg = {"model": {"_name": "mae_image_classification", "num_classes": NUM_CLASSES,
                     "pretrained_model_args": {"model": fairseq_model_cfg(), "task": {"target_length": TARGET}}}}
    return {"cfg": cfg, "model": model, **fairseq_trainer_state(77)}


def reference_forward(state: dict, fbank: torch.Tensor, prefix: str = "") -> list[torch.Tensor]:
    """Every block output (B, 1+N, D) of the official weights, written out from §2-§3."""
    t = {key: value.float() for key, value in state.items() if isinstance(value, torch.Tensor)}
    g = lambda name: t[prefix + name]  # noqa: E731
    x = (fbank - MEAN) / (2 * STD)
    conv = F.conv2d(x, g(IMAGE + "local_encoder.proj.weight"), g(IMAGE + "local_encoder.proj.bias"), stride=PATCH)
    batch, dim = conv.shape[0], conv.shape[1]
    tokens = conv.reshape(batch, dim, -1).transpose(1, 2)
    tokens = tokens + g(IMAGE + "fixed_positional_encoder.positions")[:, : tokens.shape[1]]
    h = torch.cat([g(IMAGE + "extra_tokens").expand(batch, -1, -1), tokens], dim=1)

    def layer_norm(v, w, b):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6) * w + b

    h = layer_norm(h, g(IMAGE + "context_encoder.norm.weight"), g(IMAGE + "context_encoder.norm.bias"))
    outputs = []
    head_dim = dim // HEADS
    for i in range(DEPTH):
        p = f"blocks.{i}."
        qkv = h @ g(p + "attn.qkv.weight").T + g(p + "attn.qkv.bias")
        q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
        split = lambda a: a.reshape(batch, -1, HEADS, head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = (q * head_dim**-0.5) @ k.transpose(-1, -2)
        attn = torch.softmax(scores, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(batch, -1, dim) @ g(p + "attn.proj.weight").T + g(p + "attn.proj.bias")
        u = layer_norm(h + attn, g(p + "norm1.weight"), g(p + "norm1.bias"))
        hidden = u @ g(p + "mlp.fc1.weight").T + g(p + "mlp.fc1.bias")
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        ffn = hidden @ g(p + "mlp.fc2.weight").T + g(p + "mlp.fc2.bias")
        h = layer_norm(u + ffn, g(p + "norm2.weight"), g(p + "norm2.bias"))
        outputs.append(h)
    return outputs


def raw_fbank(batch: int, frames: int, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return MEAN + STD * torch.randn(batch, 1, frames, MEL, generator=gen)


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[dict, Path]:
    checkpoint = pretrain_checkpoint()
    path = tmp_path_factory.mktemp("official") / "EAT_tiny.pt"
    torch.save(checkpoint, path)
    return checkpoint, path


def test_import_infers_config_and_maps_every_tensor(official):
    checkpoint, path = official
    imported = import_official(path)
    cfg = imported.config
    assert imported.kind == "pretrain" and imported.num_updates == 1234
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (DIM, DEPTH, HEADS, PATCH)
    assert (cfg.mel_bins, cfg.max_time_patches, cfg.target_length) == (MEL, TABLE_TIME, TARGET)
    assert (cfg.decoder_dim, cfg.decoder_groups, cfg.decoder_kernel, cfg.decoder_layers) == (
        DIM, DEC_GROUPS, DEC_KERNEL, DEC_LAYERS)
    model = checkpoint["model"]
    assert len(imported.student_encoder) == 6 + 12 * DEPTH
    assert len(imported.decoder) == 2 * DEC_LAYERS + 2 and len(imported.teacher) == 6 + 12 * DEPTH
    assert all(v.dtype == torch.float32 for part in (imported.student_encoder, imported.decoder, imported.teacher)
               for v in part.values())
    assert torch.equal(imported.student_encoder["cls_token"], model[IMAGE + "extra_tokens"].float())
    assert torch.equal(imported.student_encoder["blocks.1.mlp.fc2.weight"], model["blocks.1.mlp.fc2.weight"].float())
    assert torch.equal(imported.decoder["layers.1.conv.weight"], model[IMAGE + "decoder.blocks.1.0.weight"].float())
    assert torch.equal(imported.teacher["blocks.0.attn.qkv.bias"], model["_ema"]["blocks.0.attn.qkv.bias"])
    # The stored (fp16-rounded) table is used, not a fresh fp32 one.
    stored = model[IMAGE + "fixed_positional_encoder.positions"].float()
    assert torch.equal(imported.student_encoder["pos_embed"], stored)
    assert (stored - sincos_table(TABLE_TIME, MEL // PATCH, DIM)).abs().max() > 0


def test_heads_default_to_dim_over_64_without_cfg():
    checkpoint = pretrain_checkpoint(with_heads=False)
    imported = convert_official(checkpoint)
    assert imported.config.num_heads == max(1, DIM // 64)


def test_imported_features_match_reference_forward(official):
    checkpoint, path = official
    imported = import_official(path)
    fbank = raw_fbank(2, TARGET)
    student = build_encoder(imported)
    features = extract_features(student, fbank, layers="all")
    expected = reference_forward(checkpoint["model"], fbank)
    for ours, ref in zip(features["layers"], expected, strict=True):
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(features["utterance"], expected[-1][:, 0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(features["frames"], expected[-1][:, 1:], atol=2e-5, rtol=1e-4)
    teacher = build_encoder(imported, "teacher")
    teacher_expected = reference_forward(checkpoint["model"]["_ema"], fbank)
    torch.testing.assert_close(extract_features(teacher, fbank)["frames"], teacher_expected[-1][:, 1:],
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("frames", [PATCH, 3 * PATCH, TABLE_TIME * PATCH])
def test_other_clip_lengths_match_reference(official, frames):
    checkpoint, path = official
    encoder = build_encoder(import_official(path))
    fbank = raw_fbank(1, frames, seed=frames)
    expected = reference_forward(checkpoint["model"], fbank)[-1]
    torch.testing.assert_close(extract_features(encoder, fbank)["frames"], expected[:, 1:], atol=2e-5, rtol=1e-4)


def test_safetensors_roundtrip_is_identical(official, tmp_path):
    _, path = official
    imported = import_official(path)
    out = save_weights(imported, tmp_path / "weights.safetensors")
    reloaded = load_weights(out)
    assert reloaded.config == imported.config and reloaded.kind == "pretrain" and reloaded.num_updates == 1234
    for name in ("student_encoder", "decoder", "teacher"):
        ours, theirs = getattr(imported, name), getattr(reloaded, name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    # No pickle anywhere: the file is safetensors with the config as JSON metadata.
    assert read_config(out) == imported.config

    encoder_path = save_encoder_safetensors(imported.student_encoder, imported.config, tmp_path / "encoder.safetensors")
    encoder, cfg = load_encoder_safetensors(encoder_path)
    assert cfg == imported.config and not encoder.training
    fbank = raw_fbank(2, TARGET)
    torch.testing.assert_close(extract_features(encoder, fbank)["utterance"],
                               extract_features(build_encoder(imported), fbank)["utterance"], atol=0, rtol=0)


def test_load_into_sslam_then_save_and_reload(official, tmp_path):
    _, path = official
    imported = import_official(path, overrides={"stage": 2, "clone_batch": 2})
    assert imported.config.stage == 2 and imported.config.clone_batch == 2
    model = SSLAM(imported.config)
    load_into_sslam(model, imported)
    for key, value in imported.student_encoder.items():
        assert torch.equal(model.encoder.state_dict()[key], value)
    for key, value in imported.teacher.items():
        assert torch.equal(model.teacher.state_dict()[key], value)
    assert torch.equal(model.decoder.state_dict()["proj.weight"], imported.decoder["proj.weight"])
    assert model.teacher.pos_embed.dtype == torch.float32

    saved = save_sslam_weights(model, tmp_path / "stage2_init.safetensors", num_updates=9)
    again = SSLAM(imported.config)
    load_into_sslam(again, load_sslam_weights(saved))
    for part in ("encoder", "decoder", "teacher"):
        ours, theirs = getattr(model, part).state_dict(), getattr(again, part).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_load_into_sslam_refuses_wrong_architecture_by_name(official):
    _, path = official
    imported = import_official(path)
    other = SSLAM(ModelConfig(embed_dim=DIM, depth=DEPTH + 1, num_heads=HEADS, mel_bins=MEL, target_length=TARGET,
                              max_time_patches=TABLE_TIME, decoder_dim=DIM, decoder_groups=DEC_GROUPS,
                              decoder_layers=DEC_LAYERS))
    before = other.encoder.cls_token.detach().clone()
    with pytest.raises(CheckpointError, match=r"blocks\.2\.attn\.qkv\.weight") as error:
        load_into_sslam(other, imported)
    assert "blocks.2.norm1.weight" in error.value.missing
    assert torch.equal(other.encoder.cls_token, before)  # nothing copied


def test_teacher_required_unless_asked_to_copy_student(official):
    _, path = official
    imported = import_official(path)
    imported.teacher = None
    model = SSLAM(imported.config)
    with pytest.raises(CheckpointError, match="teacher_from_student=True"):
        load_into_sslam(model, imported)
    load_into_sslam(model, imported, teacher_from_student=True)
    key = "blocks.0.mlp.fc1.weight"
    assert torch.equal(model.teacher.state_dict()[key], imported.student_encoder[key])


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"echo pwned > {marker}",))

    checkpoint = pretrain_checkpoint()
    checkpoint["extra_state"]["payload"] = Payload()
    path = tmp_path / "evil.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="trusted=True") as error:
        import_official(path)
    assert "system" in str(error.value)
    assert not marker.exists()


def test_trusted_flag_loads_with_full_unpickler(official):
    _, path = official
    assert import_official(path, trusted=True).num_updates == 1234


def test_numpy1_module_names_are_accepted(official, tmp_path):
    """Files written under numpy 1 name `numpy.core.multiarray` for scalars and arrays."""
    _, path = official
    legacy = tmp_path / "legacy.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(legacy, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(info, data)
    assert import_official(legacy).num_updates == 1234


def _import_modified(tmp_path, modify) -> CheckpointError:
    checkpoint = pretrain_checkpoint()
    modify(checkpoint["model"])
    path = tmp_path / "modified.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError) as error:
        import_official(path)
    return error.value


def test_missing_key_is_named(tmp_path):
    error = _import_modified(tmp_path, lambda m: m.pop(IMAGE + "context_encoder.norm.bias"))
    assert error.missing == [IMAGE + "context_encoder.norm.bias"]
    assert IMAGE + "context_encoder.norm.bias" in str(error)


def test_unexpected_key_is_named(tmp_path):
    error = _import_modified(tmp_path, lambda m: m.__setitem__(IMAGE + "alibi_scale", torch.zeros(1)))
    assert error.unexpected == [IMAGE + "alibi_scale"]


def test_wrong_shape_is_named(tmp_path):
    error = _import_modified(tmp_path, lambda m: m.__setitem__("blocks.1.attn.proj.weight", torch.zeros(DIM, DIM + 1)))
    assert len(error.mismatched) == 1 and error.mismatched[0].startswith("blocks.1.attn.proj.weight")
    assert f"[{DIM}, {DIM + 1}]" in str(error)


def test_teacher_problems_are_named(tmp_path):
    error = _import_modified(tmp_path, lambda m: m["_ema"].pop("blocks.0.norm2.weight"))
    assert error.missing == ["_ema.blocks.0.norm2.weight"]


def test_pretrained_file_without_decoder_gives_encoder_only(tmp_path):
    checkpoint = pretrain_checkpoint()
    for key in [key for key in checkpoint["model"] if key.startswith(IMAGE + "decoder.")]:
        del checkpoint["model"][key]
    imported = convert_official(checkpoint)
    assert imported.decoder is None and imported.teacher is not None
    build_encoder(imported)
    with pytest.raises(CheckpointError, match="no decoder"):
        load_into_sslam(SSLAM(imported.config), imported)


def test_not_a_fairseq_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="no 'model'"):
        import_official(path)


def test_finetuned_import_gives_classifier_logits(tmp_path):
    checkpoint = finetune_checkpoint()
    path = tmp_path / "EAT_finetuned.pt"
    torch.save(checkpoint, path)
    imported = import_official(path)
    assert imported.kind == "finetune" and imported.decoder is None and imported.teacher is None
    assert imported.config.num_heads == HEADS and imported.num_updates == 77
    classifier = build_classifier(imported)
    fbank = raw_fbank(3, TARGET)
    logits = classifier(fbank)
    assert logits.shape == (3, NUM_CLASSES)
    model = checkpoint["model"]
    cls = reference_forward(model, fbank, prefix="model.")[-1][:, 0]
    expected = F.layer_norm(cls, (DIM,), model["fc_norm.weight"].float(), model["fc_norm.bias"].float(), eps=1e-6)
    expected = expected @ model["head.weight"].float().T + model["head.bias"].float()
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)

    roundtrip = load_weights(save_weights(imported, tmp_path / "finetuned.safetensors"))
    torch.testing.assert_close(build_classifier(roundtrip)(fbank), logits, atol=0, rtol=0)


def test_finetuned_head_missing_is_named(tmp_path):
    checkpoint = finetune_checkpoint()
    del checkpoint["model"]["head.bias"]
    path = tmp_path / "no_head_bias.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="head.bias"):
        import_official(path)


def test_base_model_key_set_and_shapes_on_meta():
    """The full §12 key table (ViT-B, 768 x 6144 table, 6-layer decoder), without allocating memory."""
    with torch.device("meta"):
        state = {}
        dim, depth = 768, 12

        def tensor(*shape):
            return torch.empty(*shape, dtype=torch.float16)

        state[IMAGE + "extra_tokens"] = tensor(1, 1, dim)
        state[IMAGE + "local_encoder.proj.weight"] = tensor(dim, 1, 16, 16)
        state[IMAGE + "local_encoder.proj.bias"] = tensor(dim)
        state[IMAGE + "fixed_positional_encoder.positions"] = tensor(1, 6144, dim)
        state[IMAGE + "context_encoder.norm.weight"] = tensor(dim)
        state[IMAGE + "context_encoder.norm.bias"] = tensor(dim)
        for i in range(depth):
            for name, shape in (("norm1.weight", [dim]), ("norm1.bias", [dim]), ("attn.qkv.weight", [3 * dim, dim]),
                                ("attn.qkv.bias", [3 * dim]), ("attn.proj.weight", [dim, dim]),
                                ("attn.proj.bias", [dim]), ("norm2.weight", [dim]), ("norm2.bias", [dim]),
                                ("mlp.fc1.weight", [4 * dim, dim]), ("mlp.fc1.bias", [4 * dim]),
                                ("mlp.fc2.weight", [dim, 4 * dim]), ("mlp.fc2.bias", [dim])):
                state[f"blocks.{i}.{name}"] = tensor(*shape)
        ema = {key: value.float() for key, value in state.items()}
        for j in range(6):
            state[f"{IMAGE}decoder.blocks.{j}.0.weight"] = tensor(dim, 48, 3, 3)
            state[f"{IMAGE}decoder.blocks.{j}.0.bias"] = tensor(dim)
        state[IMAGE + "decoder.proj.weight"] = tensor(dim, dim)
        state[IMAGE + "decoder.proj.bias"] = tensor(dim)
        assert len(state) == 164
        state["_ema"] = ema
    imported = convert_official({"model": state, "cfg": None, "optimizer_history": [{"num_updates": 400000}]})
    cfg = imported.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.mlp_ratio) == (768, 12, 12, 16, 4.0)
    assert (cfg.mel_bins, cfg.max_time_patches, cfg.target_length) == (128, 768, 1024)
    assert (cfg.decoder_dim, cfg.decoder_groups, cfg.decoder_kernel, cfg.decoder_layers) == (768, 16, 3, 6)
    assert len(imported.student_encoder) == 150 and len(imported.teacher) == 150 and len(imported.decoder) == 14
    trainable = sum(v.numel() for k, v in imported.student_encoder.items() if k != "pos_embed")
    assert trainable == 85_254_144
    assert sum(v.numel() for v in imported.decoder.values()) == 2_585_856
    assert imported.student_encoder["pos_embed"].shape == (1, 6144, 768)
    assert imported.num_updates == 400000
