"""Import of the official EAT / SSLAM fairseq checkpoints (SSLAM_SPEC §12): the allow-list unpickler, the key
mapping and filter, config inference from shapes and the fairseq cfg, and `import_official`, which returns the
weights under this project's names, strictly checked (model.checkpoint).

Official files are pickles. They are read with `torch.load(weights_only=True)` and an allow-list of
the numpy scalar / array / dtype globals that fairseq's `extra_state` and `optimizer_history` hold
(meter values and counters); a file that needs anything else is refused unless the caller passes
`trusted=True`.

Key mapping, official -> ours (prefix `model.` in fine-tuned files):

    modality_encoders.IMAGE.extra_tokens                     -> encoder cls_token
    modality_encoders.IMAGE.local_encoder.proj.{w,b}          -> encoder patch_embed.{w,b}
    modality_encoders.IMAGE.fixed_positional_encoder.positions -> encoder pos_embed (stored values)
    modality_encoders.IMAGE.context_encoder.norm.{w,b}        -> encoder pre_norm.{w,b}
    blocks.{i}.*                                              -> encoder blocks.{i}.*
    modality_encoders.IMAGE.decoder.blocks.{j}.0.{w,b}        -> decoder layers.{j}.conv.{w,b}
    modality_encoders.IMAGE.decoder.proj.{w,b}                -> decoder proj.{w,b}
    _ema (nested dict, same names minus decoder)             -> teacher encoder
    fc_norm.{w,b}, head.{w,b} (fine-tuned only)               -> classifier head

The imported positional table is the stored one (fp16-rounded sin-cos in fp16 runs), so the imported
model reproduces the reference bit for bit; its length fixes `max_time_patches` (rows / Fp). Longer
inputs are refused by the encoder rather than extended with recomputed rows.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.checkpoint import (
    HEAD_KEYS, CheckpointError, ImportedCheckpoint, WeightsKind, check_head, check_state, expected_shapes,
)
from model.config import ModelConfig
from model.decoder import Decoder
from model.encoder import Encoder, sincos_position_table

logger = logging.getLogger(__name__)

IMAGE = "modality_encoders.IMAGE."
DECODER = IMAGE + "decoder."
EMA_KEY = "_ema"

# The reference hard-codes 128 mel bins for single-channel input (SSLAM_SPEC §13.7); used when the
# positional table does not reveal the frequency-patch count itself.
REFERENCE_MEL_BINS = 128
# fp16 rounding of values in [-1, 1] is below 2^-11; a table matching within this is the sin-cos layout.
POSITION_TABLE_TOLERANCE = 2e-3

ENCODER_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^modality_encoders\.IMAGE\.extra_tokens$", "cls_token"),
        (r"^modality_encoders\.IMAGE\.local_encoder\.proj\.(weight|bias)$", r"patch_embed.\1"),
        (r"^modality_encoders\.IMAGE\.fixed_positional_encoder\.positions$", "pos_embed"),
        (r"^modality_encoders\.IMAGE\.context_encoder\.norm\.(weight|bias)$", r"pre_norm.\1"),
        (r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$", r"blocks.\1.\2.\3"),
    )
)
DECODER_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^modality_encoders\.IMAGE\.decoder\.blocks\.(\d+)\.0\.(weight|bias)$", r"layers.\1.conv.\2"),
        (r"^modality_encoders\.IMAGE\.decoder\.proj\.(weight|bias)$", r"proj.\1"),
    )
)

# Ours -> official, for error messages about imported files.
OFFICIAL_NAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^cls_token$", IMAGE + "extra_tokens"),
        (r"^patch_embed\.(weight|bias)$", IMAGE + r"local_encoder.proj.\1"),
        (r"^pos_embed$", IMAGE + "fixed_positional_encoder.positions"),
        (r"^pre_norm\.(weight|bias)$", IMAGE + r"context_encoder.norm.\1"),
        (r"^layers\.(\d+)\.conv\.(weight|bias)$", DECODER + r"blocks.\1.0.\2"),
        (r"^proj\.(weight|bias)$", DECODER + r"proj.\1"),
    )
)



# --------------------------------------------------------------------------------------------------
# Reading pickled (official) checkpoints safely
# --------------------------------------------------------------------------------------------------


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars, arrays and the numeric dtype classes, under both numpy 2 (`numpy._core`) and
    numpy 1 (`numpy.core`) module names: what fairseq's meters and counters pickle. Object and string
    dtypes are left out."""
    from numpy._core import multiarray

    dtype_classes = [
        type(np.dtype(name))
        for name in (
            "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
            "float16", "float32", "float64", "longdouble",
        )
    ]  # fmt: skip
    return [
        multiarray.scalar,
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        multiarray._reconstruct,
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *dtype_classes,
    ]


def read_pickled_checkpoint(path: str | Path, trusted: bool = False) -> dict[str, Any]:
    """torch.load a fairseq checkpoint on the CPU with weights_only=True and the numpy allow-list.

    A file that needs other globals (a pickle that could run code) raises CheckpointError naming them;
    `trusted=True` loads it with weights_only=False, for files whose origin you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if trusted:
        logger.warning("loading %s with weights_only=False (trusted=True): its pickle may run code", path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    else:
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            try:
                needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception:  # noqa: BLE001 - only used to improve the message
                needed = []
            allowed = {
                g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in _numpy_safe_globals()
            }
            refused = sorted(set(needed) - allowed) or ["(see the cause below)"]
            raise CheckpointError(
                f"refusing to unpickle {path}: it needs globals outside the safe allow-list: {', '.join(refused)}. "
                "Unpickling them could run arbitrary code. If you trust where the file comes from, pass "
                "trusted=True (torch.load weights_only=False)."
            ) from error
        except (RuntimeError, EOFError, OSError) as error:  # a cut or corrupt zip / legacy file
            raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {error}") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, expected a fairseq checkpoint dict")
    return checkpoint


# --------------------------------------------------------------------------------------------------
# Official key mapping and config inference
# --------------------------------------------------------------------------------------------------


def _rename(key: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, replacement in rules:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


def _to_fp32(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def split_official_state(
    state: Mapping[str, Any], prefix: str = ""
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], list[str]]:
    """Official (fairseq) model state -> (encoder, decoder, head) under our names, fp32, plus the keys
    that map to nothing. `_ema` is left out (see `map_official_teacher`)."""
    encoder: dict[str, Tensor] = {}
    decoder: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key == EMA_KEY:
            continue
        if not isinstance(value, Tensor):
            unexpected.append(key)
            continue
        if key in HEAD_KEYS:
            head[key] = _to_fp32(value)
            continue
        if not key.startswith(prefix):
            unexpected.append(key)
            continue
        inner = key[len(prefix) :]
        if (name := _rename(inner, ENCODER_RENAMES)) is not None:
            encoder[name] = _to_fp32(value)
        elif (name := _rename(inner, DECODER_RENAMES)) is not None:
            decoder[name] = _to_fp32(value)
        else:
            unexpected.append(key)
    return encoder, decoder, head, unexpected


def map_official_teacher(ema: Mapping[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """The `_ema` dict -> teacher encoder state under our names (fp32) and the keys that map to nothing.
    Decoder entries, if a file has them, are not part of the teacher and are skipped."""
    teacher: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in ema.items():
        if key.startswith(DECODER):
            continue
        name = _rename(key, ENCODER_RENAMES)
        if name is None or not isinstance(value, Tensor):
            unexpected.append(f"{EMA_KEY}.{key}")
        else:
            teacher[name] = _to_fp32(value)
    return teacher, unexpected


def _require(state: Mapping[str, Tensor], key: str, where: str) -> Tensor:
    if key not in state:
        raise CheckpointError(
            f"{where} lacks '{official_name(key)}'; cannot infer the model shape", missing=[official_name(key)]
        )
    return state[key]


def _count_indexed(state: Mapping[str, Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    if indices and indices != set(range(len(indices))):
        raise CheckpointError(f"layer indices {sorted(indices)} are not contiguous from 0 ({pattern})")
    return len(indices)


def frequency_patches_of_table(table: Tensor) -> int | None:
    """Fp of a 2-D sin-cos table (1, Tmax * Fp, D) whose first half encodes the frequency index: the first
    row after row 0 whose frequency half repeats row 0's. None when the table is not that layout
    (or lives on the meta device)."""
    if table.is_meta or table.dim() != 3 or table.shape[-1] % 4:
        return None
    rows, dim = table.shape[1], table.shape[2]
    frequency_half = table[0, :, : dim // 2].float()
    repeats = (frequency_half[1:] - frequency_half[0]).abs().amax(dim=1) < POSITION_TABLE_TOLERANCE
    candidates = torch.nonzero(repeats).flatten()
    if candidates.numel() == 0:
        return None
    freq_patches = int(candidates[0]) + 1
    if rows % freq_patches:
        return None
    expected = sincos_position_table(rows // freq_patches, freq_patches, dim)
    if (table.float() - expected).abs().amax() > POSITION_TABLE_TOLERANCE:
        return None
    return freq_patches


def _fairseq_model_cfg(fairseq_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The pre-training model section of a fairseq cfg dict (fine-tuned files nest it in
    model.pretrained_model_args)."""
    if not isinstance(fairseq_cfg, Mapping):
        return {}
    model_cfg = fairseq_cfg.get("model") or {}
    pretrained = model_cfg.get("pretrained_model_args") if isinstance(model_cfg, Mapping) else None
    if isinstance(pretrained, Mapping) and isinstance(pretrained.get("model"), Mapping):
        return dict(pretrained["model"])
    return dict(model_cfg) if isinstance(model_cfg, Mapping) else {}


def _fairseq_task_cfg(fairseq_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    if not isinstance(fairseq_cfg, Mapping):
        return {}
    model_cfg = fairseq_cfg.get("model") or {}
    pretrained = model_cfg.get("pretrained_model_args") if isinstance(model_cfg, Mapping) else None
    if isinstance(pretrained, Mapping) and isinstance(pretrained.get("task"), Mapping):
        return dict(pretrained["task"])
    task = fairseq_cfg.get("task")
    return dict(task) if isinstance(task, Mapping) else {}


# ModelConfig fields read from a fairseq cfg when present (shapes decide everything they can).
MODEL_CFG_FIELDS = {
    "num_heads": "num_heads",
    "norm_eps": "norm_eps",
    "clone_batch": "clone_batch",
    "average_top_k_layers": "average_top_k_layers",
    "ema_decay": "ema_decay",
    "ema_end_decay": "ema_end_decay",
    "ema_anneal_end_step": "ema_anneal_end_step",
    "cls_loss": "cls_loss_weight",
}
IMAGE_CFG_FIELDS = ("mask_prob", "mask_prob_adjust", "mask_length", "mask_noise_std", "target_length")


def _numeric(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def infer_config(
    encoder: Mapping[str, Tensor],
    decoder: Mapping[str, Tensor],
    fairseq_cfg: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ModelConfig:
    """A ModelConfig fitting the mapped tensors. Shapes give D, depth, patch size, MLP ratio, the decoder
    and the positional table; the fairseq cfg gives the head count (else D // 64), eps, masking, EMA and
    target length; the frequency-patch count comes from the table's sin-cos layout (else 128 mel bins,
    the reference's hard-coded value). `overrides` (ModelConfig field -> value) win over everything."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise CheckpointError(f"unknown ModelConfig fields in overrides: {unknown}")
    patch_weight = _require(encoder, "patch_embed.weight", "checkpoint")
    if patch_weight.dim() != 4 or patch_weight.shape[1] != 1 or patch_weight.shape[2] != patch_weight.shape[3]:
        raise CheckpointError(
            f"patch embedding weight has shape {list(patch_weight.shape)}; expected [D, 1, p, p] (one input channel, "
            "square patches)"
        )
    embed_dim, patch = int(patch_weight.shape[0]), int(patch_weight.shape[2])
    depth = _count_indexed(encoder, r"^blocks\.(\d+)\.")
    if depth == 0:
        raise CheckpointError("checkpoint has no transformer blocks ('blocks.0.*' missing)", missing=["blocks.0.*"])
    hidden = int(_require(encoder, "blocks.0.mlp.fc1.weight", "checkpoint").shape[0])
    table = _require(encoder, "pos_embed", "checkpoint")

    values: dict[str, Any] = {
        "embed_dim": embed_dim, "patch_size": patch, "depth": depth, "mlp_ratio": hidden / embed_dim,
    }  # fmt: skip
    model_cfg = _fairseq_model_cfg(fairseq_cfg)
    image_cfg = (model_cfg.get("modalities") or {}).get("image") or {}
    for source, field in MODEL_CFG_FIELDS.items():
        if (value := _numeric(model_cfg.get(source))) is not None:
            values[field] = value
    for field in IMAGE_CFG_FIELDS:
        if (value := _numeric(image_cfg.get(field))) is not None:
            values[field] = value
    if (value := _numeric(_fairseq_task_cfg(fairseq_cfg).get("target_length"))) is not None:
        values["target_length"] = value
    values.setdefault("num_heads", max(1, embed_dim // 64))

    freq_patches = frequency_patches_of_table(table)
    if "mel_bins" in overrides:
        if freq_patches is not None and overrides["mel_bins"] != freq_patches * patch:
            raise CheckpointError(
                f"mel_bins={overrides['mel_bins']} contradicts the positional table, which encodes "
                f"{freq_patches} frequency patches ({freq_patches * patch} mel bins)"
            )
        values["mel_bins"] = overrides["mel_bins"]
    elif freq_patches is not None:
        values["mel_bins"] = freq_patches * patch
    else:
        if not table.is_meta:
            logger.warning(
                "the positional table is not the 2-D sin-cos layout; assuming %d mel bins (pass mel_bins to override)",
                REFERENCE_MEL_BINS,
            )
        values["mel_bins"] = REFERENCE_MEL_BINS
    freq_patches = values["mel_bins"] // patch
    rows = int(table.shape[1]) if table.dim() == 3 else -1
    if freq_patches == 0 or rows <= 0 or rows % freq_patches:
        raise CheckpointError(
            f"positional table of shape {list(table.shape)} is not a whole number of rows of {freq_patches} "
            f"frequency patches (mel_bins={values['mel_bins']}, patch={patch})",
            mismatched=["pos_embed"],
        )
    values["max_time_patches"] = rows // freq_patches
    values.setdefault("target_length", ModelConfig.target_length)
    values["target_length"] = min(int(values["target_length"]), values["max_time_patches"] * patch)

    if decoder:
        conv = _require(decoder, "layers.0.conv.weight", "checkpoint decoder")
        decoder_dim = int(conv.shape[0])
        if decoder_dim != embed_dim:
            raise CheckpointError(
                f"decoder width {decoder_dim} differs from the encoder's {embed_dim}; the reference decoder then "
                "convolves the encoder width directly, which this project's decoder (input projection) cannot load"
            )
        if decoder_dim % int(conv.shape[1]):
            raise CheckpointError(f"decoder conv weight {list(conv.shape)} is not a grouped conv of width {decoder_dim}")
        values.update(
            decoder_dim=decoder_dim,
            decoder_groups=decoder_dim // int(conv.shape[1]),
            decoder_kernel=int(conv.shape[-1]),
            decoder_layers=_count_indexed(decoder, r"^layers\.(\d+)\."),
        )
    values.update(overrides)
    if values.get("average_top_k_layers") == values["depth"]:
        values["average_top_k_layers"] = 0
    config = ModelConfig(**values)
    try:
        config.validate()
    except ValueError as error:
        raise CheckpointError(f"the inferred model config is invalid: {error}") from error
    return config


def official_name(key: str, prefix: str = "") -> str:
    """The official (fairseq) name of one of our encoder / decoder keys, for messages."""
    return prefix + (_rename(key, OFFICIAL_NAMES) or key)


# --------------------------------------------------------------------------------------------------
# Official import
# --------------------------------------------------------------------------------------------------


def convert_official(
    checkpoint: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> ImportedCheckpoint:
    """An official checkpoint dict (as loaded) -> our weights and config, strictly checked."""
    state = checkpoint.get("model")
    if not isinstance(state, Mapping):
        raise CheckpointError("not a fairseq checkpoint: no 'model' state dict at the top level")
    if any(key.startswith("model." + IMAGE) for key in state):
        kind: WeightsKind = "finetune"
        prefix = "model."
    elif any(key.startswith(IMAGE) for key in state):
        kind, prefix = "pretrain", ""
    else:
        raise CheckpointError(
            f"not an EAT/SSLAM checkpoint: no '{IMAGE}*' or 'model.{IMAGE}*' keys (first keys: {list(state)[:5]})"
        )
    encoder, decoder, head, unexpected = split_official_state(state, prefix)
    if kind == "pretrain" and head:
        unexpected += sorted(head)
        head = {}
    if kind == "finetune" and decoder:
        unexpected += sorted(f"model.{IMAGE}decoder.{key}" for key in decoder)
        decoder = {}
    config = infer_config(encoder, decoder, checkpoint.get("cfg"), overrides)
    name = functools.partial(official_name, prefix=prefix)
    check_state(encoder, expected_shapes(Encoder, config), "checkpoint encoder", unexpected, name)
    if kind == "finetune":
        check_head(head, config.embed_dim)
    elif decoder:  # a pre-trained file stripped of its decoder still gives an encoder
        check_state(decoder, expected_shapes(Decoder, config), "checkpoint decoder", name=name)

    teacher = None
    ema = state.get(EMA_KEY)
    if ema is not None:
        if kind == "finetune" or not isinstance(ema, Mapping):
            raise CheckpointError(f"unexpected '{EMA_KEY}' entry ({type(ema).__name__}) in a {kind} checkpoint")
        teacher, ema_unexpected = map_official_teacher(ema)
        ema_name = functools.partial(official_name, prefix=f"{EMA_KEY}.")
        check_state(teacher, expected_shapes(Encoder, config), "checkpoint teacher (_ema)", ema_unexpected, ema_name)

    return ImportedCheckpoint(
        config=config,
        kind=kind,
        student_encoder=encoder,
        decoder=decoder or None,
        teacher=teacher,
        head=head or None,
        num_updates=_num_updates(checkpoint),
    )


def _num_updates(checkpoint: Mapping[str, Any]) -> int:
    history = checkpoint.get("optimizer_history")
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        value = _numeric(history[-1].get("num_updates"))
        if value is not None:
            return int(value)
    return 0


def import_official(
    path: str | Path, *, trusted: bool = False, overrides: Mapping[str, Any] | None = None
) -> ImportedCheckpoint:
    """Read an official EAT / SSLAM fairseq checkpoint (pre-trained or fine-tuned) into our key names.

    `overrides` sets ModelConfig fields the file cannot tell (norm_mean / norm_std of other datasets,
    mel_bins when the positional table is not the sin-cos layout) or that a stage-2 run changes.
    """
    imported = convert_official(read_pickled_checkpoint(path, trusted=trusted), overrides)
    logger.info(
        "imported %s checkpoint %s: D=%d depth=%d heads=%d, %d updates, teacher=%s",
        imported.kind, path, imported.config.embed_dim, imported.config.depth, imported.config.num_heads,
        imported.num_updates, imported.teacher is not None,
    )  # fmt: skip
    return imported
