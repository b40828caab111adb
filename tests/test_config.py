"""The job config: YAML composition, overrides, typed errors, launcher arguments, YAML round trip."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from jobs.train.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    add_config_arguments,
    config_from_args,
    dump_yaml,
    flatten,
    load_config,
    save_config,
)

NAMED_CONFIGS = ["sample", "audioset", "tiny_stage1", "tiny_stage2", "base_stage1", "base_stage2", "probe"]


@pytest.mark.parametrize("name", NAMED_CONFIGS)
def test_every_named_config_loads(name):
    config = load_config(name)
    assert isinstance(config, Config)
    assert config.model.target_length == config.data.audio.target_length


def test_base_chain_and_stage_overrides():
    stage1 = load_config("tiny_stage1")
    stage2 = load_config("tiny_stage2")
    assert (stage1.model.stage, stage2.model.stage) == (1, 2)
    assert stage2.model.embed_dim == stage1.model.embed_dim == 32
    assert stage2.data.audio.mel_bins == 64  # inherited from sample.yaml through tiny_stage1
    base2 = load_config("base_stage2")
    assert (base2.model.clone_batch, base2.train.peak_lr, base2.train.warmup_updates) == (8, 5e-5, 25000)
    assert base2.model.embed_dim == 768 and base2.data.audio.target_length == 1024


def test_set_overrides_nested_values_with_yaml_types():
    config = load_config(
        "tiny_stage1", ["train.seed=7", "model.mask_prob=0.75", "data.mixing.domain=waveform_sum", "train.betas=[0.9, 0.98]"]
    )
    assert config.train.seed == 7
    assert config.model.mask_prob == 0.75
    assert config.data.mixing.domain == "waveform_sum"
    assert config.train.betas == [0.9, 0.98]


def test_int_is_accepted_for_float():
    config = load_config("tiny_stage1", ["train.peak_lr=1"])
    assert config.train.peak_lr == 1.0 and isinstance(config.train.peak_lr, float)


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  embed_dimm: 32\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert "model.embed_dimm" in str(error.value) and str(path) in str(error.value)


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match="train.sed"):
        load_config("tiny_stage1", ["train.sed=3"])


def test_wrong_type_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_updates: lots\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    message = str(error.value)
    assert "train.max_updates" in message and "int" in message and str(path) in message


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="train.seed"):
        load_config("tiny_stage1", ["train.seed=true"])


def test_list_of_dataclasses_checked(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  source:\n    splits:\n      - {name: train, csv: a.csv, mixx: true}\n")
    with pytest.raises(ConfigError, match="data.source.splits\\[0\\].mixx"):
        load_config(str(path))


def test_shape_mismatch_between_data_and_model_is_refused():
    with pytest.raises(ConfigError, match="mel_bins"):
        load_config("tiny_stage1", ["model.mel_bins=32"])


def test_micro_batch_must_hold_whole_groups():
    with pytest.raises(ConfigError, match="multiple"):
        load_config("tiny_stage1", ["data.loader.micro_batch_clips=7"])


def test_missing_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")


def test_yaml_round_trip_is_identical(tmp_path):
    config = load_config("tiny_stage2", ["train.seed=11", "model.mask_prob=0.7"])
    path = tmp_path / "resolved.yaml"
    save_config(config, path)
    reloaded = load_config(str(path))
    assert reloaded == config
    assert dump_yaml(reloaded) == dump_yaml(config)


def test_launcher_local_rank_is_tolerated():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--local_rank=1", "--config", "tiny_stage1", "--set", "train.seed=5"])
    assert config_from_args(args).train.seed == 5
    args = parser.parse_args(["--config", "tiny_stage1", "--local-rank", "0"])
    assert config_from_args(args).train.seed == 1


def test_flatten_gives_dotted_leaves():
    flat = flatten(load_config("tiny_stage1"))
    assert flat["model.embed_dim"] == 32
    assert flat["data.audio.sample_rate"] == 16000
    assert all(not isinstance(value, dict) for value in flat.values())


def test_config_files_only_use_known_top_level_sections():
    for path in CONFIG_DIR.glob("*.yaml"):
        values = yaml.safe_load(path.read_text())
        sections = {f.name for f in dataclasses.fields(Config)} - {"name"}
        assert set(values) <= {"base", "name", *sections}, path
