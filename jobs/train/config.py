"""The one job configuration: composes the pipeline's and the model's dataclasses with the job settings.

A config is a YAML file (a bare name resolves to `jobs/configs/NAME.yaml`) plus `--set a.b=value`
overrides. Unknown keys and wrong types raise `ConfigError` naming the key and the file. The DeepSpeed
launcher's `--local_rank` is accepted and ignored (ranks read LOCAL_RANK from the environment).

Every field is checked at load, so no value is silently misread: a `Literal[...]` annotation lists the allowed
values of an enum field, and a field's `metadata` may bound a number (`ge`, `gt`, `le`, `lt`; on a list, each
item). `train.deepspeed` is the one free-form mapping: DeepSpeed settings the project does not generate itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model.config import ModelConfig
from pipeline.config import DataConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Aliases a run's config may not move (tracking.aliases), and why.
REFUSED_ALIASES = {
    "latest": "MLflow reserves it: models:/NAME/latest is the newest version",
    "best": "moved only by `sslam evaluate --promote`, when the metric beats its holder's",
}
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,255}")
VERSION_LIKE_ALIAS = re.compile(r"[vV]\d+")


@dataclass
class TrainConfig:
    """Optimisation and run control for the pre-training job (SSLAM_SPEC §10, §14)."""

    output_dir: str = "runs/pretrain"
    seed: int = field(default=1, metadata={"ge": 0})
    max_updates: int = field(default=400000, metadata={"ge": 1})
    warmup_updates: int = field(default=53333, metadata={"ge": 0})
    peak_lr: float = field(default=5e-4, metadata={"gt": 0})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata={"ge": 0, "lt": 1})
    eps: float = field(default=1e-8, metadata={"gt": 0})
    weight_decay: float = field(default=0.05, metadata={"ge": 0})
    weight_decay_mode: Literal["all", "exclude_norm_bias"] = "all"  # "all" is the reference's
    gradient_clipping: float = field(default=4.0, metadata={"ge": 0})  # 0: no clipping
    gradient_accumulation: int = field(default=1, metadata={"ge": 1})
    # When set, clean clips per update for any rank count: accumulation = clips / (micro_batch_clips x ranks).
    clips_per_update: int = field(default=0, metadata={"ge": 0})
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    epochs: int = field(default=0, metadata={"ge": 0})  # 0: stop at max_updates only
    log_interval: int = field(default=10, metadata={"ge": 1})
    checkpoint_interval: int = field(default=10000, metadata={"ge": 1})
    keep_checkpoints: int = field(default=1, metadata={"ge": 0})  # 0: keep every checkpoint
    resume: str = "auto"  # "auto" | "never" | a checkpoint directory
    init_from: str = ""  # stage 2: a stage-1 checkpoint of ours or an official EAT .pt
    init_from_trusted: bool = False  # unpickle an official .pt without the safe allow-list (trusted files only)
    dataset_fingerprint: str = ""  # when set, dataset.json must carry this fingerprint
    allow_dataset_change: bool = False  # resume onto shards whose fingerprint differs from the checkpoint's
    verify_checkpoint_checksums: bool = False  # resume re-hashes every checkpoint file, not only its size
    min_target_var: float = field(default=0.0, metadata={"ge": 0})  # collapse guard floors; 0 disables
    min_pred_var: float = field(default=0.0, metadata={"ge": 0})
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    collective_timeout_s: int = field(default=300, metadata={"ge": 1})
    record_samples: bool = False  # write each rank's consumed sample keys (resume checks)
    # torch.compile the student's transformer blocks and decoder and the teacher's blocks (ZeRO 0-2).
    compile: bool = False
    # Merged into the generated DeepSpeed config (jobs.train.engine.deepspeed_config), nested mappings key by key;
    # keys the project sets itself (DEEPSPEED_OWNED_KEYS) are refused.
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    """MLflow tracking and registry (jobs.mlops.tracking, jobs.mlops.registry)."""

    enabled: bool = True  # false: no MLflow at all (metrics.jsonl and checkpoints only)
    experiment: str = "sslam"
    run_name: str = ""
    model_name: str = "sslam-encoder"
    # Which checkpoints become versions of `model_name`: none, the last one of a run that finished, or each one.
    register: Literal["never", "end", "every_checkpoint"] = "end"
    # Aliases each registration of the run moves (base presets: [candidate]); none by default, so a smoke run never
    # takes an alias that consumers follow. `latest` is MLflow's, `best` is `sslam evaluate --promote`'s.
    aliases: list[str] = field(default_factory=list)
    system_metrics: bool = True
    # Seconds between system-metrics samples; 0: MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL when set, else scaled to the
    # run (1/20 of the time elapsed, from 1 s up to MLflow's 10 s: jobs.mlops.lineage.system_metrics_interval).
    system_metrics_interval_s: float = field(default=0.0, metadata={"ge": 0, "le": 3600})
    # Metric values waiting for MLflow; the oldest are dropped (and counted) beyond.
    queue_size: int = field(default=10000, metadata={"ge": 1})
    retry_interval_s: float = field(default=5.0, metadata={"gt": 0})  # wait between attempts while MLflow is down
    finish_timeout_s: float = field(default=60.0, metadata={"ge": 0})  # how long the end of a run waits for MLflow

    def validate(self) -> None:
        refused = {alias: REFUSED_ALIASES[alias.lower()] for alias in self.aliases if alias.lower() in REFUSED_ALIASES}
        if refused:
            raise ConfigError(
                "tracking.aliases may not name "
                + "; ".join(f"{alias!r} ({why})" for alias, why in refused.items())
                + f", got {self.aliases}"
            )
        for alias in self.aliases:
            if not ALIAS_PATTERN.fullmatch(alias) or VERSION_LIKE_ALIAS.fullmatch(alias):
                raise ConfigError(
                    f"tracking.aliases: {alias!r} is not an MLflow alias (letters, digits, '_' and '-', not of the "
                    "form v<number>, which names a version)"
                )
        if len(set(self.aliases)) != len(self.aliases):
            raise ConfigError(f"tracking.aliases names an alias twice: {self.aliases}")


@dataclass
class PolyphonicConfig:
    """Polyphonic evaluation (jobs.train.polyphonic_eval): seeded mixtures of test-split clips of different classes."""

    enabled: bool = False
    sources: list[int] = field(default_factory=lambda: [2, 3], metadata={"ge": 2, "le": 8})  # clips per mixture
    mixtures: int = field(default=200, metadata={"ge": 1})  # mixtures per source count
    seed: int = field(default=0, metadata={"ge": 0})
    # "rms": every source scaled to the same RMS (that of the quietest source) before the sum.
    loudness: Literal["rms"] = "rms"


@dataclass
class EvalConfig:
    """Linear-probe protocol (jobs.evaluate)."""

    train_shards: str = ""
    test_shards: str = ""
    train_split: str = "train"
    test_split: str = "eval"
    # "mean": all patch tokens; "content_mean": only those holding content (batch key valid_frames).
    pooling: Literal["cls", "mean", "content_mean"] = "cls"
    whiten: bool = False  # PCA-whiten the standardised features (fit on the probe's train split) before the probe
    epochs: int = field(default=100, metadata={"ge": 1})
    lr: float = field(default=1e-3, metadata={"gt": 0})
    weight_decay: float = field(default=0.0, metadata={"ge": 0})
    batch_size: int = field(default=64, metadata={"ge": 1})
    seed: int = field(default=0, metadata={"ge": 0})
    use_head: bool = True  # score a model's own classifier head directly when it covers the dataset's classes
    polyphonic: PolyphonicConfig = field(default_factory=PolyphonicConfig)


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning (jobs.finetune, SSLAM_SPEC §11); optimisation and run control come from `train`."""

    # models:/NAME@ALIAS (checked, jobs.mlops.registry.load_verified), a pre-training run or checkpoint folder, or an
    # official EAT / SSLAM .pt file. The student encoder is fine-tuned; a head in the source is not used.
    source: str = ""
    source_trusted: bool = False  # unpickle an official .pt without the safe allow-list (trusted files only)
    train_split: str = "train"  # a labelled split of data.loader.shards
    eval_shards: str = ""  # "" -> data.loader.shards
    eval_split: str = "eval"
    eval_interval: int = field(default=1000, metadata={"ge": 1})  # updates between mAP evaluations (and the end)
    eval_batch_size: int = field(default=64, metadata={"ge": 1})
    pooling: Literal["cls", "mean"] = "cls"
    min_lr: float = field(default=1e-6, metadata={"ge": 0})
    layer_decay: float = field(default=0.65, metadata={"gt": 0, "le": 1})
    drop_path_rate: float = field(default=0.1, metadata={"ge": 0, "lt": 1})
    mixup_alpha: float = field(default=0.8, metadata={"ge": 0})  # 0: no mixup
    mixup_prob: float = field(default=0.9, metadata={"ge": 0, "le": 1})
    mask_ratio: float = field(default=0.2, metadata={"ge": 0, "lt": 1})  # SpecAugment; 0: none
    # "permutation": every clip once per epoch, reshuffled; "weighted": `clips_per_epoch` clips drawn without
    # replacement with torch.multinomial from `sample_weights` (the reference's AS-2M sampling).
    sampling: Literal["permutation", "weighted"] = "permutation"
    # One float per line (clips in the split's order) or lines `sample_key,weight`.
    sample_weights: str = ""
    clips_per_epoch: int = field(default=0, metadata={"ge": 0})  # weighted sampling; 0: the split's size
    # "": hold the train split in memory. A local folder (node-local disk): the split is written there once as a
    # memory-mapped clip cache, reused by later runs and resumes of the same shard set (jobs.train.finetune_cache).
    cache_dir: str = ""


@dataclass
class Config:
    name: str = "sslam"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        self.model.validate()
        self.tracking.validate()
        audio = self.data.audio
        if (audio.target_length, audio.mel_bins) != (self.model.target_length, self.model.mel_bins):
            raise ConfigError(
                f"data.audio (target_length={audio.target_length}, mel_bins={audio.mel_bins}) does not match "
                f"model (target_length={self.model.target_length}, mel_bins={self.model.mel_bins})"
            )
        if self.train.zero_stage == 0 and self.train.precision != "fp32":
            # DeepSpeed's stage-0 bf16/fp16 optimizers expose no fp32 master fragments for the teacher EMA.
            raise ConfigError("train.zero_stage=0 needs train.precision=fp32; use ZeRO 1-3 for bf16/fp16")
        if self.train.compile and self.train.zero_stage == 3:
            # ZeRO-3 gathers each block's parameters in module hooks, which compiled blocks would trace.
            raise ConfigError("train.compile=true needs train.zero_stage 0-2, got 3")
        if len(self.train.betas) != 2:
            raise ConfigError(f"train.betas must be two values (beta1, beta2), got {self.train.betas}")
        if audio.min_sample_rate > audio.max_sample_rate:
            raise ConfigError(
                f"data.audio.min_sample_rate ({audio.min_sample_rate}) exceeds max_sample_rate ({audio.max_sample_rate})"
            )
        check_deepspeed_passthrough(self.train.deepspeed)
        _check_mixing_domain(self.data.mixing.domain)
        if self.data.loader.micro_batch_clips % self.data.mixing.group_size:
            raise ConfigError(
                f"data.loader.micro_batch_clips ({self.data.loader.micro_batch_clips}) must be a multiple of "
                f"data.mixing.group_size ({self.data.mixing.group_size})"
            )
        if self.model.padding == "aware" and self.model.stage == 2 and self.data.mixing.mix_padding != "silence":
            # With "zero", a short partner's zero padding wins the log-mel max over the primary's content.
            raise ConfigError(
                "model.padding=aware with model.stage=2 needs data.mixing.mix_padding=silence, got "
                f"{self.data.mixing.mix_padding!r}"
            )


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


# The DeepSpeed settings jobs.train.engine.deepspeed_config generates, as dotted DeepSpeed keys, and what sets them.
# train.deepspeed may neither set one nor replace a mapping holding one; everything else passes through.
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "data.loader.micro_batch_clips x ranks x accumulation",
    "train_micro_batch_size_per_gpu": "data.loader.micro_batch_clips",
    "gradient_accumulation_steps": "train.gradient_accumulation / train.clips_per_update",
    "gradient_clipping": "train.gradient_clipping",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "fp16.initial_scale_power": "the recipe's fp16 loss scaler",
    "fp16.loss_scale_window": "the recipe's fp16 loss scaler",
    "fp16.min_loss_scale": "the recipe's fp16 loss scaler",
    "fp16.loss_scale": "the recipe's fp16 loss scaler (dynamic)",
    "amp": "train.precision",
    "torch_autocast": "train.precision",
    "optimizer": "the job's AdamW (train.peak_lr, train.betas, train.eps, train.weight_decay)",
    "scheduler": "the job's schedule (train.warmup_updates, train.max_updates)",
    "zero_allow_untested_optimizer": "the job's AdamW",
}


def _leaf_keys(mapping: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        keys += _leaf_keys(value, f"{dotted}.") if isinstance(value, dict) and value else [dotted]
    return keys


def check_deepspeed_passthrough(passthrough: dict) -> None:
    """Refuse, naming them all, the leaves of `train.deepspeed` that set, replace or reach into an owned key."""
    refused = []
    for key in _leaf_keys(passthrough):
        owner = next((owned for owned in DEEPSPEED_OWNED_KEYS
                      if key == owned or owned.startswith(f"{key}.") or key.startswith(f"{owned}.")), None)
        if owner is not None:
            refused.append(f"train.deepspeed.{key} (set by {DEEPSPEED_OWNED_KEYS[owner]})")
    if refused:
        raise ConfigError(f"train.deepspeed may not set keys the project generates: {'; '.join(refused)}")


def merge_deepspeed_passthrough(generated: dict, passthrough: dict) -> dict:
    """`generated` with `passthrough` merged in, nested mappings key by key; refuses owned keys."""
    check_deepspeed_passthrough(passthrough)
    return _merge(generated, passthrough)


def resolve_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if named.exists():
        return named
    raise ConfigError(f"config not found: {name_or_path} (neither a file nor a name in {CONFIG_DIR})")


def _check_mixing_domain(domain: str) -> None:
    """The domain names a registered mixer, so a new strategy is its module plus its registry line."""
    from pipeline.mixers import MIXERS  # lazy: the mixers import torch, which loading a config does not need

    if domain not in MIXERS:
        raise ConfigError(f"'data.mixing.domain' must be one of {', '.join(map(repr, MIXERS))}, got {domain!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        # Types compared too: `true` is not the literal 1.
        if not any(type(value) is type(option) and value == option for option in allowed):
            raise ConfigError(
                f"{source}: '{key}' must be one of {', '.join(map(repr, allowed))}, got {value!r}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: '{key}' has the wrong type {type(value).__name__}, expected {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        key_type, item = typing.get_args(tp)
        for k in value:
            _coerce(k, key_type, f"{key} key {k!r}", source)
        return {k: _coerce(v, item, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(
                f"{source}: '{key}' has the wrong type {type(value).__name__} ({value!r}), expected {_type_name(tp)}"
            )
        return value
    raise ConfigError(f"{source}: '{key}' has an unsupported annotation {tp}")


# Field metadata key -> (how a message writes it, the check).
RANGE_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _check_range(value: Any, bounds: dict, key: str, source: str) -> None:
    """A field's `metadata` bounds (`ge`, `gt`, `le`, `lt`) hold for a number, or for each item of a list."""
    if not bounds:
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_range(item, bounds, f"{key}[{i}]", source)
        return
    limits = [(RANGE_BOUNDS[name], bound) for name, bound in bounds.items()]
    if not all(holds(value, bound) for (_, holds), bound in limits):
        allowed = " and ".join(f"{symbol} {bound}" for (symbol, _), bound in limits)
        raise ConfigError(f"{source}: '{key}' must be {allowed}, got {value!r}")


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{source}: unknown key '{where}{unknown[0]}' (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, source)
        _check_range(kwargs[name], fields[name].metadata, key, source)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got '{text}'")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Load YAML (with an optional `base:` file it extends), apply overrides, check types and shapes."""
    path = resolve_path(name_or_path)
    values = _read_yaml(path)
    overrides = overrides or []
    for text in overrides:
        keys, value = _parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        values = _merge(values, nested)
    source = f"{path} (with --set {' '.join(overrides)})" if overrides else str(path)
    config = _build(Config, values, "", source)
    try:
        config.validate()
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    return config


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = values.pop("base", None)
    if base is None:
        return values
    return _merge(_read_yaml(_resolve_base(path, str(base)), seen + (path,)), values)


def _resolve_base(path: Path, base: str) -> Path:
    """`base:` is a file relative to the config that names it, or a config name in jobs/configs."""
    candidates = [Path(base) if Path(base).is_absolute() else path.parent / base, CONFIG_DIR / base]
    for candidate in candidates:
        for option in (candidate, candidate.with_suffix(".yaml")):
            if option.is_file():
                return option
    raise ConfigError(f"{path}: base '{base}' not found (looked beside the file and in {CONFIG_DIR})")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(config))


def flatten(config: Config) -> dict[str, Any]:
    """Dotted keys to leaf values, e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            out[prefix] = value

    walk("", to_dict(config))
    return out


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--config C`, repeated `--set k=v`, and the DeepSpeed launcher's `--local_rank` (ignored)."""
    parser.add_argument("--config", default=default, required=default is None, help="YAML file or name in jobs/configs")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.seed=3"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
