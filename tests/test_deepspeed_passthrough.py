"""`train.deepspeed`: DeepSpeed settings the project does not generate pass through into the engine's config
(nested mappings merged key by key); the keys it generates are refused at load, naming them; DeepSpeed's own
schema check turns a misspelt key into exit 2 at the rank; a real one-rank run takes a passthrough setting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main as sslam
from jobs.train.config import DEEPSPEED_OWNED_KEYS, ConfigError, _leaf_keys, load_config
from jobs.train.engine import check_deepspeed_accepts, deepspeed_config
from shardsets import write_training_set

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "jobs" / "pretrain.py")
# Generated defaults a passthrough may change: they only quieten DeepSpeed's own logging.
OVERRIDABLE_DEFAULTS = {"steps_per_print", "wall_clock_breakdown"}

PASSTHROUGH = [
    "train.deepspeed.zero_optimization.overlap_comm=true",
    "train.deepspeed.zero_optimization.reduce_bucket_size=50000000",
    "train.deepspeed.flops_profiler={enabled: true, profile_step: 5}",
    "train.deepspeed.comms_logger={enabled: true, verbose: false}",
    "train.deepspeed.wall_clock_breakdown=true",
]


def test_passthrough_is_merged_key_by_key_and_leaves_owned_keys_alone():
    plain = deepspeed_config(load_config("base_stage2"), world_size=4)
    merged = deepspeed_config(load_config("base_stage2", PASSTHROUGH), world_size=4)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 50000000}
    assert merged["flops_profiler"] == {"enabled": True, "profile_step": 5}
    assert merged["comms_logger"] == {"enabled": True, "verbose": False}
    assert merged["wall_clock_breakdown"] is True
    untouched = {k: v for k, v in plain.items() if k not in ("zero_optimization", "wall_clock_breakdown")}
    assert {k: merged[k] for k in untouched} == untouched


def test_the_owned_table_names_every_key_the_job_generates():
    """A key added to deepspeed_config() without an entry in DEEPSPEED_OWNED_KEYS (which would let
    train.deepspeed silently override it) fails here."""
    for precision in ("bf16", "fp16", "fp32"):
        generated = deepspeed_config(load_config("tiny_stage1", [f"train.precision={precision}"]), world_size=2)
        for key in _leaf_keys(generated):
            assert key in DEEPSPEED_OWNED_KEYS or key in OVERRIDABLE_DEFAULTS, key


@pytest.mark.parametrize("owned", sorted(DEEPSPEED_OWNED_KEYS))
def test_every_owned_key_is_refused_naming_it_and_its_setting(owned):
    with pytest.raises(ConfigError) as error:
        load_config("tiny_stage1", [f"train.deepspeed.{owned}=1"])
    message = str(error.value)
    assert f"train.deepspeed.{owned} (set by {DEEPSPEED_OWNED_KEYS[owned]})" in message, message


@pytest.mark.parametrize("text, named", [
    ("train.deepspeed.zero_optimization=3", "train.deepspeed.zero_optimization (set by train.zero_stage)"),
    ("train.deepspeed.bf16={enabled: true}", "train.deepspeed.bf16.enabled (set by train.precision)"),
    ("train.deepspeed.optimizer.params.lr=0.1", "train.deepspeed.optimizer.params.lr (set by the job's AdamW"),
    ("train.deepspeed.scheduler={type: WarmupLR}", "train.deepspeed.scheduler.type (set by the job's schedule"),
])
def test_replacing_or_reaching_into_an_owned_key_is_refused(text, named):
    with pytest.raises(ConfigError, match="may not set keys the project generates") as error:
        load_config("tiny_stage1", [text])
    assert named in str(error.value)


def test_every_refused_key_is_named_at_once(tmp_path):
    path = tmp_path / "ds.yaml"
    path.write_text("base: tiny_stage1\ntrain:\n  deepspeed:\n    train_batch_size: 96\n"
                    "    zero_optimization: {stage: 3, overlap_comm: true}\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    message = str(error.value)
    assert "train.deepspeed.train_batch_size" in message and "train.deepspeed.zero_optimization.stage" in message
    assert "overlap_comm" not in message and str(path) in message


def test_the_field_takes_a_free_form_mapping_and_nothing_else(tmp_path):
    path = tmp_path / "ds.yaml"
    path.write_text("base: tiny_stage1\ntrain:\n  deepspeed:\n    zero_optimization:\n      offload_optimizer:\n"
                    "        device: cpu\n        pin_memory: true\n    flops_profiler: {enabled: false}\n")
    config = load_config(str(path))
    assert config.train.deepspeed["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    with pytest.raises(ConfigError, match="'train.deepspeed' must be a mapping, got int"):
        load_config("tiny_stage1", ["train.deepspeed=3"])


def test_deepspeed_refuses_a_misspelt_section_key_as_a_config_error():
    config = load_config("tiny_stage1", ["train.deepspeed.zero_optimization.overlap_com=true"])
    with pytest.raises(ConfigError, match="train.deepspeed: DeepSpeed refuses the config: .*overlap_com"):
        check_deepspeed_accepts(deepspeed_config(config, world_size=1))
    check_deepspeed_accepts(deepspeed_config(load_config("tiny_stage1", PASSTHROUGH), world_size=1))


def test_pretrain_entry_point_exits_2_naming_the_owned_key(capsys):
    """Tried: `sslam pretrain --set train.deepspeed.train_batch_size=96`. Survives: exit 2 before any rank
    starts, naming the key and the setting that owns it."""
    code = sslam(["pretrain", "--config", "tiny_stage1", "--set", "train.deepspeed.train_batch_size=96"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.deepspeed.train_batch_size (set by data.loader.micro_batch_clips x ranks x accumulation)" in err


def _single_rank_env() -> dict[str, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))


def _pretrain(shards: Path, output: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, PRETRAIN, "--config", "tiny_stage1", "--set", f"data.loader.shards={shards}",
            "--set", f"train.output_dir={output}", "--set", "data.loader.num_workers=0",
            "--set", "tracking.enabled=false", "--set", "train.max_updates=3"]
    for override in overrides:
        args += ["--set", override]
    return subprocess.run(args, cwd=output.parent, env=_single_rank_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_real_rank_takes_passthrough_settings_and_refuses_a_misspelt_one(tmp_path):
    """One rank as the launcher starts it: overlap_comm and the flops profiler pass through (the profiler writes
    its report after the profiled step, so DeepSpeed did read the merged config); a misspelt ZeRO key exits 2 naming it."""
    shards = tmp_path / "shards"
    write_training_set(shards, target_length=512, mel_bins=64, num_shards=1, groups_per_shard=4)
    report = tmp_path / "flops.txt"
    result = _pretrain(shards, tmp_path / "run", "train.deepspeed.zero_optimization.overlap_comm=true",
                       f"train.deepspeed.flops_profiler={{enabled: true, profile_step: 2, output_file: {report}}}")
    assert result.returncode == 0, result.stderr[-4000:]
    profile = report.read_text()
    assert "DeepSpeed Flops Profiler" in profile and "Profile Summary at step" in profile and "fwd MACs" in profile
    assert "finished at update 3" in result.stderr

    result = _pretrain(shards, tmp_path / "typo", "train.deepspeed.zero_optimization.overlap_com=true")
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert "train.deepspeed: DeepSpeed refuses the config" in result.stderr and "overlap_com" in result.stderr
