"""Elastic resume through the launcher: one epoch served by four runs on 2 -> 1 -> 2 -> 3 CPU ranks, each
resuming the previous run's checkpoint from elsewhere, with ZeRO 1 -> 1 -> 3 -> 2 (the last in bf16).

Per resume, tests/elastic_resume_driver.py reports what the engine holds right after the restore: the full
fp32 weights, Adam moments and teacher equal the checkpoint's exactly, and so do the Adam step, the
learning rates, the schedule, the update count and rank 0's RNG state; rank 0's running CLS-target centre is the
mean of the saved ranks' centres. The 18 clean clips per update are
kept on every rank count (accumulation 3, 6, 3, 2), the learning rate and EMA decay follow the schedule of
one run, and the 24 samples of epoch 0 are consumed exactly once across the four runs. A rank count that
cannot keep the checkpoint's clips per update exits 2 saying why, before the engine is built.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from jobs.train import checkpointing
from jobs.train.config import load_config
from model.sslam import SSLAM
from test_pretrain_launch import (  # noqa: F401 (shards is a fixture)
    REPO, deepspeed_command, free_port, pretrain_args, read_jsonl, run, shards, single_rank_env,
)

pytestmark = pytest.mark.slow

DRIVER = str(REPO / "tests" / "elastic_resume_driver.py")
COMMON = ("data.loader.micro_batch_clips=3", "train.clips_per_update=18", "train.checkpoint_interval=1",
          "train.record_samples=true", "train.log_interval=100", "train.keep_checkpoints=5",
          "model.utterance_center=running")
# (name, ranks, ZeRO stage, updates at the end, resumes from); the last run trains in bf16, so its fp32
# masters must come from the checkpoint, not from the module's rounded copies.
CHAIN = [("a", 2, 1, 1, None), ("b", 1, 1, 2, "a"), ("c", 2, 3, 3, "b"), ("d", 3, 2, 5, "c")]
BF16 = {"d"}
EPOCH_SAMPLES = 24  # 3 shards x 8 groups; 18 clips = 6 groups per update: epoch 0 is updates 1-4


def driver_args(shards: Path, output: Path, *overrides: str) -> list[str]:
    return [DRIVER, *pretrain_args(shards, output, *COMMON, *overrides)[1:]]


@pytest.fixture(scope="module")
def chain(shards, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("elastic")
    outputs: dict[str, Path] = {}
    for name, ranks, zero, updates, source in CHAIN:
        output = tmp / name
        overrides = [f"train.zero_stage={zero}", f"train.max_updates={updates}",
                     f"train.precision={'bf16' if name in BF16 else 'fp32'}"]
        if source is not None:
            source_updates = next(u for n, _, _, u, _ in CHAIN if n == source)
            folder = checkpointing.checkpoint_root(outputs[source]) / checkpointing.tag_for(source_updates)
            overrides.append(f"train.resume={folder}")
        args = driver_args(shards, output, *overrides)
        if ranks == 1:
            result = run([sys.executable, *args], tmp, timeout=900, **single_rank_env(free_port()))
        else:
            result = run(deepspeed_command(*args, ranks=ranks), tmp, timeout=900)  # generous on a shared machine
        assert result.returncode == 0, f"run {name}: " + (result.stdout + result.stderr)[-4000:]
        outputs[name] = output
    return outputs


@pytest.mark.parametrize("name", ["b", "c", "d"])
def test_the_restored_engine_holds_the_checkpoint_exactly(chain, name):
    restored = json.loads((chain[name] / "restored.json").read_text())
    assert restored["elastic"] is True
    assert restored["weights"] == 0.0 and restored["moments"] == 0.0 and restored["teacher"] == 0.0
    got, want = restored["moment_names"]
    assert got == want and len(got) > 10
    for key in ("adam_step", "group_lrs", "scheduler_epoch", "updates"):
        assert restored[key][0] == restored[key][1], key
    assert restored["rng_rank0"] is True
    # On another rank count every rank starts from the mean of the saved ranks' running centres.
    centre, saved = restored["utterance_centre"]
    source = next(s for n, _, _, _, s in CHAIN if n == name)
    source_ranks = next(ranks for n, ranks, _, _, _ in CHAIN if n == source)
    assert len(saved) == source_ranks and all(values is not None for values in saved)
    torch.testing.assert_close(torch.tensor(centre), torch.tensor(saved).mean(dim=0), rtol=0, atol=1e-7)


def test_updates_learning_rate_and_ema_continue_one_schedule(chain):
    config = load_config("tiny_stage1")
    model = SSLAM(config.model)
    seen = []
    for name, ranks, _, updates, _ in CHAIN:
        for record in read_jsonl(chain[name] / "metrics.jsonl"):
            seen.append(record["update"])
            u = record["update"]
            assert record["lr"] == pytest.approx(config.train.peak_lr * min(1.0, (u - 1) / config.train.warmup_updates))
            assert record["ema_decay"] == pytest.approx(model.ema_decay(u), abs=1e-12)
        samples = read_jsonl(chain[name] / "samples_rank0.jsonl")
        steps_per_update = 18 // (3 * ranks)
        assert Counter(r["update"] for r in samples) == {u: steps_per_update for u in {r["update"] for r in samples}}
    assert seen == [1, 2, 3, 4, 5]


def test_every_sample_of_the_epoch_is_consumed_once_across_the_layouts(chain):
    consumed = []
    for name, ranks, _, _, _ in CHAIN:
        for rank in range(ranks):
            for record in read_jsonl(chain[name] / f"samples_rank{rank}.jsonl"):
                if record["update"] < 4:  # the update in progress: 0-3 are epoch 0
                    consumed += record["keys"]
    counts = Counter(consumed)
    assert len(counts) == EPOCH_SAMPLES, sorted(counts)
    assert set(counts.values()) == {1}, [k for k, n in counts.items() if n > 1]


@pytest.mark.parametrize(("overrides", "message"), [
    (("train.clips_per_update=6",), "an update would take 6"),
    (("data.loader.micro_batch_clips=12",), "is not a multiple of micro_batch_clips x ranks (12 x 1)"),
])
def test_clips_per_update_that_cannot_be_kept_exits_2(chain, shards, tmp_path, overrides, message):
    resume = checkpointing.checkpoint_root(chain["a"]) / checkpointing.tag_for(1)
    args = pretrain_args(shards, tmp_path / "out", *COMMON, f"train.resume={resume}", *overrides)
    result = run([sys.executable, *args], tmp_path, timeout=900, **single_rank_env(free_port()))
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-3000:]
    assert "took 18 clean clips per update on 2 ranks, this run has 1" in log and message in log
    assert "DP world size" not in log


def test_a_resume_on_another_rank_count_keeps_the_checkpoints_clips_per_update_when_unset(chain, shards, tmp_path):
    resume = checkpointing.checkpoint_root(chain["a"]) / checkpointing.tag_for(1)
    output = tmp_path / "out"
    args = pretrain_args(shards, output, *COMMON, f"train.resume={resume}", "train.clips_per_update=0",
                         "train.max_updates=2")
    result = run([sys.executable, *args], tmp_path, timeout=900, **single_rank_env(free_port()))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "took 18 clean clips per update on 2 ranks, this run has 1: keeping those clips per update" in log
    micro_steps = Counter(r["update"] for r in read_jsonl(output / "samples_rank0.jsonl"))
    assert micro_steps == {1: 6}  # update 2 from 18 clips = 6 micro-batches of 3 on one rank
