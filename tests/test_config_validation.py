"""No silent misconfiguration: every enum and range of the config dataclasses is checked at load.

The sweep below is generated from the dataclasses themselves (every `Literal` field gets a value outside its
choices, every bounded number a value just past each bound), so a new field is covered the day it is added; the
classification test fails when a new field is neither checked nor declared free-form. The contract table pins
the messages of the fields people get wrong most.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from jobs.cli import main as sslam
from jobs.train.config import CONFIG_DIR, RANGE_BOUNDS, Config, ConfigError, _build, load_config, save_config

REPO = Path(__file__).resolve().parents[1]

# Fields whose values are paths, names, patterns or free numbers: nothing to check beyond the type.
FREE_FORM = {
    "name",
    "data.source.audio_root", "data.source.audio_roots", "data.source.class_labels_csv", "data.source.filename_pattern",
    "data.source.extensions", "data.source.splits[].name", "data.source.splits[].csv",
    "data.shards.output", "data.loader.shards", "data.loader.split",
    "model.norm_mean",
    "train.output_dir", "train.resume", "train.init_from", "train.dataset_fingerprint",
    "train.deepspeed",  # free-form DeepSpeed settings; owned keys are refused (tests/test_deepspeed_passthrough.py)
    "tracking.experiment", "tracking.run_name", "tracking.model_name",
    "data.mixing.domain",  # a registered mixer's name, checked in Config.validate against pipeline.mixers.MIXERS
    "tracking.aliases",  # names, checked in TrackingConfig.validate (tests/test_registration_policy.py)
    "eval.train_shards", "eval.test_shards", "eval.train_split", "eval.test_split",
    "finetune.source", "finetune.train_split", "finetune.eval_shards", "finetune.eval_split",
    "finetune.sample_weights", "finetune.cache_dir",
}


@dataclasses.dataclass
class Leaf:
    key: str  # dotted; "[]" marks the items of a list of dataclasses
    owner: type  # the dataclass declaring the field
    field: dataclasses.Field
    hint: Any


def leaves(cls: type = Config, prefix: str = "") -> list[Leaf]:
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            found += leaves(hint, f"{key}.")
        elif typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            found += leaves(args[0], f"{key}[].")
        else:
            found.append(Leaf(key, cls, f, hint))
    return found


def scalar_type(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint


def override(key: str, value: Any) -> str:
    """`--set` text putting `value` at `key` (inside a one-item list for list-of-dataclass fields)."""
    if "[]." in key:
        outer, inner = key.split("[].")
        return f"{outer}={json.dumps([{inner: value}])}"
    return f"{key}={json.dumps(value)}"


def bad_values(leaf: Leaf) -> list[tuple[Any, str, list[str]]]:
    """(bad value, key in the message, texts the message must hold) for an enum or bounded field."""
    if typing.get_origin(leaf.hint) is Literal:
        choices = typing.get_args(leaf.hint)
        bad = "not-a-choice" if isinstance(choices[0], str) else max(choices) + 1
        return [(bad, leaf.key, [repr(c) for c in choices])]
    kind = scalar_type(leaf.hint)
    rows = []
    for name, bound in leaf.field.metadata.items():
        symbol, _ = RANGE_BOUNDS[name]
        step = 1 if kind is int else 0.5
        outside = {"ge": bound - step, "gt": bound, "le": bound + step, "lt": bound}[name]
        outside = kind(outside)
        if typing.get_origin(leaf.hint) is list:
            rows.append(([outside, outside], f"{leaf.key}[0]", [f"{symbol} {bound}", repr(outside)]))
        else:
            rows.append((outside, leaf.key, [f"{symbol} {bound}", repr(outside)]))
    return rows


CHECKED = [leaf for leaf in leaves() if typing.get_origin(leaf.hint) is Literal or leaf.field.metadata]
SWEEP = [(leaf, *row) for leaf in CHECKED for row in bad_values(leaf)]


def test_every_field_is_checked_or_declared_free_form():
    """A new enum kept as a plain `str` (or a count without bounds) fails here until it is a `Literal` (or
    has bounds) or is listed in FREE_FORM."""
    unclassified = []
    for leaf in leaves():
        kind = scalar_type(leaf.hint)
        assert set(leaf.field.metadata) <= set(RANGE_BOUNDS), f"{leaf.key}: unknown bound {dict(leaf.field.metadata)}"
        if kind is bool or typing.get_origin(kind) is Literal or leaf.key in FREE_FORM:
            continue
        if kind in (int, float) and leaf.field.metadata:
            continue
        unclassified.append(f"{leaf.key}: {leaf.hint}")
    assert not unclassified, "fields with neither a check nor a FREE_FORM entry:\n" + "\n".join(unclassified)
    assert not FREE_FORM - {leaf.key for leaf in leaves()}, "FREE_FORM names fields that no longer exist"


def test_the_sweep_reaches_the_fields_of_every_dataclass():
    owners = {leaf.owner.__name__ for leaf, *_ in SWEEP}
    assert {"TrainConfig", "TrackingConfig", "EvalConfig", "ModelConfig", "AudioConfig", "SourceConfig",
            "MixingConfig", "ShardConfig", "LoaderConfig", "SynthConfig"} <= owners
    assert len(SWEEP) >= 60


@pytest.mark.parametrize("leaf, bad, key, texts", SWEEP, ids=[f"{row[0].key}={row[1]!r}" for row in SWEEP])
def test_a_value_outside_the_allowed_ones_is_refused_naming_key_value_and_allowed(leaf, bad, key, texts):
    with pytest.raises(ConfigError) as error:
        load_config("tiny_stage1", [override(leaf.key, bad)])
    message = str(error.value)
    assert f"'{key}'" in message, message
    for text in texts:
        assert text in message, message


@pytest.mark.parametrize("leaf", [leaf for leaf in CHECKED if leaf.field.metadata], ids=lambda leaf: leaf.key)
def test_values_on_an_inclusive_bound_or_just_inside_are_accepted(leaf):
    kind = scalar_type(leaf.hint)
    for name, bound in leaf.field.metadata.items():
        inside = kind({"ge": bound, "le": bound, "gt": bound + 1e-3, "lt": bound - 1e-3}[name])
        if kind is int and name in ("gt", "lt"):
            inside = bound + (1 if name == "gt" else -1)
        value = [inside, inside] if typing.get_origin(leaf.hint) is list else inside
        built = _build(leaf.owner, {leaf.field.name: value}, "", "test")
        assert getattr(built, leaf.field.name) == value


CONTRACT = [
    ("train.precision=bfloat16", "'train.precision' must be one of 'bf16', 'fp16', 'fp32', got 'bfloat16'"),
    ("train.zero_stage=4", "'train.zero_stage' must be one of 0, 1, 2, 3, got 4"),
    ("train.zero_stage=true", "'train.zero_stage' must be one of 0, 1, 2, 3, got True"),
    ("train.on_nonfinite_loss=skipp", "'train.on_nonfinite_loss' must be one of 'stop', 'skip', got 'skipp'"),
    ("train.weight_decay_mode=none", "'train.weight_decay_mode' must be one of 'all', 'exclude_norm_bias'"),
    ("eval.pooling=max", "'eval.pooling' must be one of 'cls', 'mean', 'content_mean', got 'max'"),
    ("data.mixing.domain=waveform", "'data.mixing.domain' must be one of 'logmel_max', 'waveform_sum'"),
    ("data.mixing.mix_padding=silent", "'data.mixing.mix_padding' must be one of 'zero', 'silence'"),
    ("data.source.kind=folders", "'data.source.kind' must be one of 'audioset', 'folder', got 'folders'"),
    ("model.stage=3", "'model.stage' must be one of 1, 2, got 3"),
    ("data.audio.frame_shift_ms=0", "'data.audio.frame_shift_ms' must be > 0, got 0.0"),
    ("data.audio.frame_length_ms=-25", "'data.audio.frame_length_ms' must be > 0, got -25.0"),
    ("data.mixing.group_size=1", "'data.mixing.group_size' must be >= 2, got 1"),
    ("train.max_updates=0", "'train.max_updates' must be >= 1, got 0"),
    ("data.loader.micro_batch_clips=0", "'data.loader.micro_batch_clips' must be >= 1, got 0"),
    ("model.mask_prob=1.0", "'model.mask_prob' must be >= 0 and < 1, got 1.0"),
    ("model.ema_decay=1.5", "'model.ema_decay' must be >= 0 and <= 1, got 1.5"),
    ("train.betas=[0.9, 1.5]", "'train.betas[1]' must be >= 0 and < 1, got 1.5"),
    ("train.betas=[0.9]", "train.betas must be two values (beta1, beta2), got [0.9]"),
    ("model.decoder_kernel=4", "model.decoder_kernel must be odd (same padding), got 4"),
    ("data.audio.min_sample_rate=500000", "data.audio.min_sample_rate (500000) exceeds max_sample_rate (384000)"),
]


@pytest.mark.parametrize("text, expected", CONTRACT, ids=[row[0] for row in CONTRACT])
def test_contract_messages(text, expected):
    with pytest.raises(ConfigError) as error:
        load_config("tiny_stage1", [text])
    assert expected in str(error.value)


def test_compile_with_zero_3_is_refused():
    assert load_config("tiny_stage1", ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="train.compile=true needs train.zero_stage 0-2, got 3"):
        load_config("tiny_stage1", ["train.compile=true", "train.zero_stage=3"])


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f"base: {CONFIG_DIR / 'tiny_stage1.yaml'}\ntrain:\n  precision: bfloat16\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(path) in str(error.value) and "'train.precision'" in str(error.value)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_file_passes_the_checks(path):
    assert isinstance(load_config(str(path)), Config)


def test_every_default_passes_the_checks(tmp_path):
    """The dataclass defaults, written out in full and loaded back, pass every check unchanged."""
    path = tmp_path / "defaults.yaml"
    save_config(Config(), path)
    assert load_config(str(path)) == Config()


def test_pretrain_entry_point_exits_2_naming_key_value_and_choices(tmp_path):
    """Tried: `sslam pretrain --set train.precision=bfloat16` (the console entry, a real process). Survives:
    exit 2 before any rank starts, one line naming the key, the value and the allowed values."""
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "pretrain", "--config", "tiny_stage1", "--set", "train.precision=bfloat16"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "'train.precision' must be one of 'bf16', 'fp16', 'fp32', got 'bfloat16'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_preprocess_entry_point_exits_2_on_a_bad_range(capsys):
    assert sslam(["preprocess", "--config", "sample", "--set", "data.audio.frame_shift_ms=0"]) == 2
    assert "'data.audio.frame_shift_ms' must be > 0, got 0.0" in capsys.readouterr().err
