"""Bad arguments and configs through every entry point: the `sslam` console entry (`python -m jobs.cli`, or
`jobs.cli.main` in-process where that is cheap), `python -m jobs.preprocess` and `python jobs/pretrain.py`
(one rank, as the deepspeed launcher would start it).

Each must exit non-zero (2 for config and argument errors) with a line naming the offending key, path or flag,
and without a Python traceback. In-process, "no traceback" means `main` returns instead of raising.
Already covered elsewhere: an unknown `--set` key of make-sample-data (tests/test_cli.py), preprocessing
config contradictions (tests/test_preprocess.py), a dataset.json whose shapes differ from the config
(tests/test_pretrain_launch.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml

from jobs.cli import main as sslam
from jobs.train.config import CONFIG_DIR
from reliability_support import (
    PRETRAIN,
    PYTHON,
    assert_clean_failure,
    cpu_env,
    preprocess_config,
    run_command,
    single_rank_env,
)
from shardsets import write_training_set

CLI = [PYTHON, "-m", "jobs.cli"]
PREPROCESS = [PYTHON, "-m", "jobs.preprocess"]


def _tiny_shards(directory: Path) -> Path:
    write_training_set(directory, target_length=512, mel_bins=64, num_shards=1, groups_per_shard=2)
    return directory


def _pretrain_args(shards: Path, output: Path, *overrides: str) -> list[str]:
    args = [PRETRAIN, "--config", "tiny_stage1", "--set", f"data.loader.shards={shards}",
            "--set", f"train.output_dir={output}", "--set", "data.loader.num_workers=0",
            "--set", "tracking.enabled=false", "--set", "train.max_updates=1"]
    for override in overrides:
        args += ["--set", override]
    return args


# ------------------------------------------------------------------------------------ the sslam console entry


def test_unknown_subcommand_exits_2_naming_it(tmp_path):
    """Tried: `sslam frobnicate`. Survives: exit 2, argparse's line names the command and the valid ones."""
    result = run_command([*CLI, "frobnicate"], cwd=tmp_path)
    assert_clean_failure(result, 2, "invalid choice: 'frobnicate'", "make-sample-data")


def test_unknown_flag_exits_2_naming_it(tmp_path):
    """Tried: `sslam inspect DIR --bogus`. Survives: exit 2 naming the flag."""
    result = run_command([*CLI, "inspect", str(tmp_path), "--bogus"], cwd=tmp_path)
    assert_clean_failure(result, 2, "unrecognized arguments: --bogus")


def test_wrong_type_override_exits_2_naming_the_key(capsys):
    """Tried: `sslam pretrain --set train.max_updates=abc`. Survives: exit 2 before any rank starts, naming the
    key, the value and the expected type."""
    assert sslam(["pretrain", "--config", "tiny_stage1", "--set", "train.max_updates=abc"]) == 2
    err = capsys.readouterr().err
    assert "'train.max_updates' has the wrong type str ('abc'), expected int" in err


def test_unknown_key_in_a_config_file_exits_2_naming_key_and_file(tmp_path, capsys):
    """Tried: a YAML file with a misspelt nested key. Survives: exit 2 naming the dotted key and the file."""
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({"base": str(CONFIG_DIR / "sample.yaml"), "data": {"synth": {"train_clipz": 3}}}))
    assert sslam(["make-sample-data", str(tmp_path / "out"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'data.synth.train_clipz'" in err and str(config) in err
    assert not (tmp_path / "out").exists()


def test_missing_config_file_exits_2_naming_it(tmp_path, capsys):
    """Tried: `sslam preprocess --config /no/such.yaml`. Survives: exit 2 naming the path, before Ray starts."""
    missing = str(tmp_path / "no_such.yaml")
    assert sslam(["preprocess", "--config", missing]) == 2
    assert f"config not found: {missing}" in capsys.readouterr().err


def test_override_without_a_value_exits_2_naming_it(capsys):
    """Tried: `--set train.seed` (no `=`). Survives: exit 2 naming the override."""
    assert sslam(["pretrain", "--config", "tiny_stage1", "--set", "train.seed"]) == 2
    assert "--set expects section.key=value, got 'train.seed'" in capsys.readouterr().err


def test_config_file_that_is_not_yaml_exits_2_naming_it(tmp_path, capsys):
    """Tried: a config file with a YAML syntax error. Survives: exit 2 naming the file (and line)."""
    config = tmp_path / "broken.yaml"
    config.write_text("data: [unclosed\n")
    assert sslam(["make-sample-data", str(tmp_path / "out"), "--config", str(config)]) == 2
    assert str(config) in capsys.readouterr().err


def test_config_whose_base_is_missing_exits_2_naming_it(tmp_path, capsys):
    """Tried: a config file whose `base:` names a file that does not exist. Survives: exit 2 naming the base."""
    config = tmp_path / "child.yaml"
    config.write_text("base: no_such_base\nname: child\n")
    assert sslam(["make-sample-data", str(tmp_path / "out"), "--config", str(config)]) == 2
    assert "no_such_base" in capsys.readouterr().err


def test_inspect_of_a_folder_without_dataset_json_fails_cleanly(tmp_path, capsys):
    """Tried: `sslam inspect` on a folder that is not a shard set. Survives: non-zero exit naming the folder."""
    assert sslam(["inspect", str(tmp_path)]) != 0
    assert str(tmp_path) in capsys.readouterr().err


def test_register_of_a_missing_official_file_fails_cleanly(tmp_path, capsys):
    """Tried: `sslam register --official missing.pt --name n`. Survives: non-zero exit naming the file, and
    nothing registered (the file is read before MLflow is touched)."""
    missing = str(tmp_path / "missing.pt")
    assert sslam(["register", "--official", missing, "--name", "n"]) != 0
    assert missing in capsys.readouterr().err


def test_register_of_a_missing_run_folder_exits_2(tmp_path, capsys):
    """Tried: `sslam register RUN_DIR` with a folder that does not exist. Survives: exit 2 naming it."""
    missing = str(tmp_path / "no_run")
    with pytest.raises(SystemExit) as exit_info:
        sslam(["register", missing])
    assert exit_info.value.code == 2
    assert f"no run folder {missing}" in capsys.readouterr().err


def test_evaluate_without_shard_locations_exits_2(caplog):
    """Tried: `sslam evaluate` with both shard locations empty. Survives: exit 2 naming the options to set,
    before any model is loaded."""
    with caplog.at_level(logging.ERROR, logger="sslam.evaluate"):
        code = sslam(["evaluate", "--model", "models:/absent@candidate",
                      "--set", "eval.train_shards=", "--set", "eval.test_shards="])
    assert code == 2
    assert "--train-shards/--test-shards or eval.train_shards/test_shards" in caplog.text


def test_infer_of_a_missing_audio_file_exits_1_naming_it(tmp_path, capsys):
    """Tried: `sslam infer missing.wav --model URI`. Survives: exit 1 naming the file and the reason, before
    any model is loaded."""
    missing = str(tmp_path / "missing.wav")
    assert sslam(["infer", missing, "--model", "models:/absent@candidate"]) == 1
    assert f"cannot read {missing}" in capsys.readouterr().err


@pytest.fixture
def empty_tracking(tmp_path) -> dict[str, str]:
    """A child environment whose MLflow store is an empty sqlite file in tmp_path."""
    return cpu_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_infer_with_an_unknown_model_fails_cleanly(tmp_path, empty_tracking):
    """Tried: `sslam infer tone.wav --model models:/absent@candidate` on an empty registry. Survives: non-zero
    exit with a line naming the model URI, no traceback."""
    audio = tmp_path / "tone.wav"
    soundfile.write(audio, np.zeros(16000, dtype=np.float32), 16000)
    result = run_command([*CLI, "infer", str(audio), "--model", "models:/absent@candidate"], cwd=tmp_path,
                         env=empty_tracking)
    assert_clean_failure(result, None, "models:/absent@candidate")


def test_evaluate_with_an_unknown_model_fails_cleanly(tmp_path, empty_tracking):
    """Tried: `sslam evaluate --model models:/absent@candidate` on an empty registry. Survives: non-zero exit
    with a line naming the model URI, no traceback."""
    shards = _tiny_shards(tmp_path / "shards")
    result = run_command([*CLI, "evaluate", "--model", "models:/absent@candidate", "--train-shards", str(shards),
                          "--test-shards", str(shards)], cwd=tmp_path, env=empty_tracking)
    assert_clean_failure(result, None, "models:/absent@candidate")


def test_pretrain_with_zero_ranks_exits_2(tmp_path):
    """Tried: `sslam pretrain --ranks 0`. Survives: exit 2 naming --ranks, no launcher started."""
    result = run_command([*CLI, "pretrain", "--config", "tiny_stage1", "--ranks", "0",
                          "--set", f"data.loader.shards={tmp_path / 'none'}", "--set", "tracking.enabled=false",
                          "--set", f"train.output_dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120)
    assert_clean_failure(result, 2, "--ranks")


# ------------------------------------------------------------------------------------ python -m jobs.preprocess


def test_preprocess_unknown_override_exits_2_before_ray(tmp_path):
    """Tried: `python -m jobs.preprocess --set data.shards.groups_per_shardz=3`. Survives: exit 2 naming the key;
    Ray never starts (no "Started a local Ray instance")."""
    result = run_command([*PREPROCESS, "--config", "sample", "--set", "data.shards.groups_per_shardz=3"], cwd=tmp_path)
    assert_clean_failure(result, 2, "preprocess: config error", "unknown key 'data.shards.groups_per_shardz'")
    assert "Started a local Ray instance" not in result.stderr


def test_preprocess_bad_flag_value_exits_2(capsys):
    """Tried: `python -m jobs.preprocess --num-cpus two`. Survives: exit 2 naming the flag and the value."""
    from jobs.preprocess import main as preprocess_main

    with pytest.raises(SystemExit) as exit_info:
        preprocess_main(["--config", "sample", "--num-cpus", "two"])
    assert exit_info.value.code == 2
    assert "argument --num-cpus: invalid int value: 'two'" in capsys.readouterr().err


def test_preprocess_missing_split_csv_exits_2_naming_it(hostile_job, tmp_path):
    """Tried: a config whose training CSV does not exist. Survives: exit 2 naming the split and the CSV path;
    no output folder content."""
    config = preprocess_config(tmp_path / "job.yaml", hostile_job.data, tmp_path / "out")
    missing = tmp_path / "no_such_segments.csv"
    result = run_command([*PREPROCESS, "--config", str(config), "--num-cpus", "1", "--no-progress",
                          "--set", f"data.source.splits=[{{name: train, csv: {missing}, mix: true}}]"], cwd=tmp_path)
    assert_clean_failure(result, 2, "config error", "split 'train'", str(missing))
    assert not list((tmp_path / "out").glob("*.tar"))


def test_preprocess_missing_audio_root_exits_2_naming_it(hostile_job, tmp_path):
    """Tried: a config whose audio_root does not exist. Survives: exit 2 with the error line naming the
    audio root (not only a log warning), nothing written."""
    config = preprocess_config(tmp_path / "job.yaml", hostile_job.data, tmp_path / "out")
    missing = tmp_path / "no_such_audio"
    result = run_command([*PREPROCESS, "--config", str(config), "--num-cpus", "1", "--no-progress",
                          "--set", f"data.source.audio_root={missing}"], cwd=tmp_path)
    assert_clean_failure(result, 2, "config error", str(missing))


# ------------------------------------------------------------------------------------ python jobs/pretrain.py


def test_pretrain_unknown_override_exits_2_naming_it(tmp_path):
    """Tried: `python jobs/pretrain.py --set train.max_updatez=3` as rank 0 of 1. Survives: exit 2 with a line
    naming the key, no traceback, nothing written."""
    result = run_command([PYTHON, *_pretrain_args(tmp_path, tmp_path / "run", "train.max_updatez=3")],
                         cwd=tmp_path, env=single_rank_env())
    assert_clean_failure(result, 2, "config error", "unknown key 'train.max_updatez'")
    assert not (tmp_path / "run").exists()


def test_pretrain_unknown_flag_exits_2(capsys):
    """Tried: `python jobs/pretrain.py --config tiny_stage1 --bogus`. Survives: exit 2 naming the flag, before
    any process group."""
    from jobs.pretrain import main as pretrain_main

    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(["--config", "tiny_stage1", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_pretrain_missing_or_mistyped_config_exits_2(tmp_path, caplog):
    """Tried: `python jobs/pretrain.py --config missing.yaml`, and a file with `train.max_updates: many`.
    Survives: exit 2 for both, naming the file and the key (no process group is started)."""
    from jobs.pretrain import main as pretrain_main

    mistyped = tmp_path / "mistyped.yaml"
    base = str(CONFIG_DIR / "tiny_stage1.yaml")
    mistyped.write_text(yaml.safe_dump({"base": base, "train": {"max_updates": "many"}}))
    with caplog.at_level(logging.ERROR, logger="sslam.train"):
        assert pretrain_main(["--config", str(tmp_path / "missing.yaml")]) == 2
        assert pretrain_main(["--config", str(mistyped)]) == 2
    assert f"config not found: {tmp_path / 'missing.yaml'}" in caplog.text
    assert "'train.max_updates' has the wrong type str ('many')" in caplog.text


def test_pretrain_on_a_folder_without_dataset_json_exits_2(tmp_path):
    """Tried: `python jobs/pretrain.py` with data.loader.shards pointing at a folder without dataset.json.
    Survives: exit 2 with a line naming the folder and dataset.json, no traceback, no checkpoint."""
    (tmp_path / "not_shards").mkdir()
    result = run_command([PYTHON, *_pretrain_args(tmp_path / "not_shards", tmp_path / "run")],
                         cwd=tmp_path, env=single_rank_env())
    assert_clean_failure(result, 2, "dataset.json", str(tmp_path / "not_shards"))
    assert not (tmp_path / "run" / "checkpoints").exists()

