"""Model weights in and out of this project's own safetensors files (encoder-only for registered models; student +
teacher for stage-2 initialisation; encoder + head for fine-tuned models) and strict loading into our modules:
`CheckpointError` names every missing, unexpected and wrongly shaped key. The weights travel as an
`ImportedCheckpoint` (fp32, our key names, the `ModelConfig` that fits them); official fairseq files are imported
into one by model.official, modules are built from one by model.build.

Our own files are safetensors with the resolved `ModelConfig` as JSON metadata: nothing is ever pickled.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from model.config import ModelConfig
from model.decoder import Decoder
from model.encoder import Encoder, sincos_position_table
from model.sslam import SSLAM
from pipeline.atomic import write_with

WeightsKind = Literal["pretrain", "finetune", "encoder"]

HEAD_KEYS = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")

SAFETENSORS_FORMAT = "sslam-weights"
SAFETENSORS_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; names every offending key."""

    def __init__(
        self,
        message: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []


@dataclass
class ImportedCheckpoint:
    """Weights under this project's key names, fp32, plus the config that fits them.

    kind: "pretrain" (student encoder + decoder, teacher when the file has one), "finetune" (encoder +
    classifier head) or "encoder" (encoder only).
    """

    config: ModelConfig
    kind: WeightsKind
    student_encoder: dict[str, Tensor]
    decoder: dict[str, Tensor] | None = None
    teacher: dict[str, Tensor] | None = None
    head: dict[str, Tensor] | None = None
    num_updates: int = 0


# --------------------------------------------------------------------------------------------------
# Strict checks against our modules
# --------------------------------------------------------------------------------------------------


def expected_shapes(module_type: type[nn.Module], cfg: ModelConfig) -> dict[str, torch.Size]:
    """State-dict shapes of Encoder(cfg) / Decoder(cfg), built on the meta device (no memory)."""
    with torch.device("meta"):
        module = module_type(cfg)
    return {key: value.shape for key, value in module.state_dict().items()}


def check_state(
    state: Mapping[str, Tensor],
    expected: Mapping[str, torch.Size],
    what: str,
    extra_unexpected: list[str] = (),
    name: Callable[[str], str] = str,
) -> None:
    """Raise CheckpointError listing every missing, unexpected and wrongly shaped key (rendered by `name`)."""
    missing = sorted(name(key) for key in set(expected) - set(state))
    unexpected = sorted(name(key) for key in set(state) - set(expected)) + list(extra_unexpected)
    mismatched = sorted(
        f"{name(key)}: checkpoint {list(state[key].shape)} vs model {list(expected[key])}"
        for key in set(state) & set(expected)
        if state[key].shape != expected[key]
    )
    if missing or unexpected or mismatched:
        lines = [f"{what} does not fit the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  wrong shapes ({len(mismatched)}): {'; '.join(mismatched)}")
        raise CheckpointError("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)


def check_head(head: Mapping[str, Tensor], embed_dim: int) -> None:
    missing = [key for key in HEAD_KEYS if key not in head]
    if missing:
        raise CheckpointError(f"fine-tuned checkpoint lacks classifier keys {missing}", missing=missing)
    num_classes = int(head["head.weight"].shape[0])
    expected = {
        "fc_norm.weight": torch.Size([embed_dim]),
        "fc_norm.bias": torch.Size([embed_dim]),
        "head.weight": torch.Size([num_classes, embed_dim]),
        "head.bias": torch.Size([num_classes]),
    }
    check_state(head, expected, "classifier head")


# --------------------------------------------------------------------------------------------------
# Loading weights into our modules
# --------------------------------------------------------------------------------------------------


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """module.load_state_dict(state, strict=True) after a check that names every offending key."""
    check_state(state, {key: value.shape for key, value in module.state_dict().items()}, what)
    module.load_state_dict(state, strict=True)


def load_into_sslam(model: SSLAM, weights: ImportedCheckpoint, *, teacher_from_student: bool = False) -> None:
    """Put student encoder + decoder and the teacher into an `SSLAM` model (stage-2 initialisation).

    Everything is checked before anything is copied. A file without a teacher is refused unless
    `teacher_from_student=True`, which starts the teacher as a copy of the student encoder. Run this
    before a training engine wraps (and possibly shards) the student.
    """
    if weights.decoder is None:
        raise CheckpointError(
            f"{weights.kind} weights have no decoder; stage-2 initialisation needs pre-training weights"
        )
    if weights.teacher is None and not teacher_from_student:
        raise CheckpointError(
            "the weights have no teacher (_ema); pass teacher_from_student=True to start the teacher from the student"
        )
    teacher_state = weights.teacher if weights.teacher is not None else weights.student_encoder
    checks = (
        (model.encoder, weights.student_encoder, "student encoder"),
        (model.decoder, weights.decoder, "decoder"),
        (model.teacher, teacher_state, "teacher"),
    )
    for module, state, what in checks:
        check_state(state, {key: value.shape for key, value in module.state_dict().items()}, what)
    for module, state, what in checks:
        module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------
# Our own files: safetensors + config JSON metadata
# --------------------------------------------------------------------------------------------------


def config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def config_from_json(text: str) -> ModelConfig:
    """ModelConfig from its JSON; unknown fields are refused (a newer or foreign file)."""
    values = json.loads(text)
    if not isinstance(values, dict):
        raise CheckpointError("model config metadata is not a JSON object")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise CheckpointError(f"model config metadata has unknown fields {unknown}")
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


def _plain_tensor(tensor: Tensor) -> Tensor:
    """fp32 (floating point), contiguous, on the CPU, owning its storage (safetensors refuses shared storage)."""
    tensor = tensor.detach().to("cpu")
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.contiguous().clone()


def save_weights(weights: ImportedCheckpoint, path: str | Path) -> Path:
    """Write weights as one safetensors file; parts are key prefixes `encoder.`, `decoder.`, `teacher.`,
    `head.`; metadata holds the config JSON, the kind and the update count. Checked before writing."""
    cfg = weights.config
    check_state(weights.student_encoder, expected_shapes(Encoder, cfg), "student encoder")
    tensors = {f"encoder.{key}": _plain_tensor(value) for key, value in weights.student_encoder.items()}
    if weights.decoder is not None:
        check_state(weights.decoder, expected_shapes(Decoder, cfg), "decoder")
        tensors.update({f"decoder.{key}": _plain_tensor(value) for key, value in weights.decoder.items()})
    if weights.teacher is not None:
        check_state(weights.teacher, expected_shapes(Encoder, cfg), "teacher")
        tensors.update({f"teacher.{key}": _plain_tensor(value) for key, value in weights.teacher.items()})
    if weights.head is not None:
        check_head(weights.head, cfg.embed_dim)
        tensors.update({f"head.{key}": _plain_tensor(value) for key, value in weights.head.items()})
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "format_version": SAFETENSORS_VERSION,
        "kind": weights.kind,
        "num_updates": str(int(weights.num_updates)),
        "model_config": config_to_json(cfg),
    }
    return write_with(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of one of our safetensors files, without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != SAFETENSORS_FORMAT or "model_config" not in metadata:
        raise CheckpointError(f"{path} is not an {SAFETENSORS_FORMAT} safetensors file (metadata: {sorted(metadata)})")
    if metadata.get("format_version") != SAFETENSORS_VERSION:
        raise CheckpointError(
            f"{path} has format version {metadata.get('format_version')}, expected {SAFETENSORS_VERSION}"
        )
    return metadata


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig stored in one of our safetensors files."""
    return config_from_json(read_metadata(path)["model_config"])


def is_plain_state_file(path: str | Path) -> bool:
    """True for a safetensors file without our metadata, such as a checkpoint's `student.safetensors` (the full
    student's state dict: `encoder.` and `decoder.` keys, no config)."""
    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("format") != SAFETENSORS_FORMAT


def load_weights(
    path: str | Path, device: str | torch.device = "cpu", config: ModelConfig | None = None
) -> ImportedCheckpoint:
    """Read a file written by `save_weights`; the parts are checked against the stored config.

    A plain state file (a checkpoint's `student.safetensors`, see `is_plain_state_file`) carries no config: it is
    read with `config` (the checkpoint's `model` section), its `encoder.` / `decoder.` / `teacher.` / `head.` keys
    becoming the parts; without `config` it is refused, naming what is needed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    plain = is_plain_state_file(path)
    if plain:
        if config is None:
            raise CheckpointError(
                f"{path} is a plain state file (e.g. a checkpoint's student.safetensors) without a model config: pass "
                "config= (the checkpoint's config.yaml `model` section; model.pretrained.load_encoder reads it)"
            )
        metadata = {"kind": "encoder", "num_updates": "0"}
        cfg = config
    else:
        metadata = read_metadata(path)
        cfg = config_from_json(metadata["model_config"])
    tensors = load_file(str(path), device=str(device))
    parts: dict[str, dict[str, Tensor]] = {"encoder": {}, "decoder": {}, "teacher": {}, "head": {}}
    for key, value in tensors.items():
        part, _, name = key.partition(".")
        if part not in parts or not name:
            raise CheckpointError(
                f"{path}: key '{key}' belongs to no part (encoder/decoder/teacher/head)", unexpected=[key]
            )
        parts[part][name] = value
    if plain and parts["encoder"] and "pos_embed" not in parts["encoder"]:  # a buffer: the fixed sin-cos table
        parts["encoder"]["pos_embed"] = sincos_position_table(cfg.max_time_patches, cfg.freq_patches, cfg.embed_dim)
    kind = metadata.get("kind", "encoder")
    if plain and parts["decoder"]:  # a full student: encoder + decoder
        kind = "pretrain"
    if kind not in typing.get_args(WeightsKind):
        raise CheckpointError(f"{path} has unknown kind {kind!r}")
    weights = ImportedCheckpoint(
        config=cfg,
        kind=kind,  # type: ignore[arg-type]
        student_encoder=parts["encoder"],
        decoder=parts["decoder"] or None,
        teacher=parts["teacher"] or None,
        head=parts["head"] or None,
        num_updates=int(metadata.get("num_updates", "0")),
    )
    check_state(weights.student_encoder, expected_shapes(Encoder, cfg), f"{path} encoder")
    if weights.decoder is not None:
        check_state(weights.decoder, expected_shapes(Decoder, cfg), f"{path} decoder")
    if weights.teacher is not None:
        check_state(weights.teacher, expected_shapes(Encoder, cfg), f"{path} teacher")
    if weights.head is not None:
        check_head(weights.head, cfg.embed_dim)
    return weights


def save_encoder_safetensors(encoder_state: Mapping[str, Tensor], cfg: ModelConfig, path: str | Path) -> Path:
    """The encoder alone (a registered model's artifact): fp32 tensors + the resolved config."""
    return save_weights(ImportedCheckpoint(config=cfg, kind="encoder", student_encoder=dict(encoder_state)), path)


def load_encoder_safetensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[Encoder, ModelConfig]:
    """(Encoder in eval mode, its config) from any of our weight files (the student encoder part)."""
    weights = load_weights(path, device=device)
    encoder = Encoder(weights.config).to(device)
    load_state_strict(encoder, weights.student_encoder, f"{path} encoder")
    return encoder.eval(), weights.config


def sslam_weights(model: SSLAM, num_updates: int = 0) -> ImportedCheckpoint:
    """Student encoder + decoder + teacher of an `SSLAM` model (full, unsharded tensors) as weights."""
    return ImportedCheckpoint(
        config=model.cfg,
        kind="pretrain",
        student_encoder=dict(model.encoder.state_dict()),
        decoder=dict(model.decoder.state_dict()),
        teacher=dict(model.teacher.state_dict()),
        num_updates=num_updates,
    )


def save_sslam_weights(model: SSLAM, path: str | Path, num_updates: int = 0) -> Path:
    """Student + teacher of an `SSLAM` model in one safetensors file (stage-2 initialisation)."""
    return save_weights(sslam_weights(model, num_updates), path)


def load_sslam_weights(path: str | Path, device: str | torch.device = "cpu") -> ImportedCheckpoint:
    """Weights written by `save_sslam_weights`; put them into a model with `load_into_sslam`."""
    return load_weights(path, device=device)
