"""benchmarks/gpu_check.sh without a GPU: its plan (dry run), its refusals (bad arguments, missing wheels or
shards, no CUDA), and the Python helpers it runs, for real on the CPU with the tiny config: the ZeRO step
(DeepSpeed on the CPU), the plain ViT reference, the bf16/fp32 check, and the summary over their lines plus a
launch's trace and log."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PYTHON = sys.executable


def env(**extra: str) -> dict:
    base = {key: value for key, value in os.environ.items() if key != "OUT"}
    base.update(PYTHON=PYTHON, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1", **extra)
    return base


def gpu_check(*args: str, cwd: Path = REPO, timeout: int = 60, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def planned_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith(" ")]


def test_dry_run_prints_every_step_without_a_gpu(tmp_path):
    result = gpu_check("--dry-run", "--out", str(tmp_path / "o"), "--micro-batches", "12,24,48")
    assert result.returncode == 0, result.stderr
    commands = planned_commands(result.stdout)
    modules = [c[c.index("-m") + 1] for c in commands if "-m" in c]
    assert modules == ["pip", "benchmarks.zero_step", "benchmarks.vit_reference", "benchmarks.precision_check",
                       "deepspeed.launcher.runner", "benchmarks.gpu_check_summary"]
    install = commands[0]
    assert "--no-index" in install and "deepspeed==0.19.8" in install and "--find-links" in install
    for command in commands[1:3]:
        assert command[command.index("--micro-batches") + 1] == "12,24,48"
        assert command[command.index("--modes") + 1] == "eager,compiled"
    (launch,) = [c for c in commands if "deepspeed.launcher.runner" in c]
    assert launch[1:6] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port"]
    assert launch[launch.index("jobs/pretrain.py") + 1:][:2] == ["--config", "base_stage2"]
    sets = [launch[i + 1] for i, arg in enumerate(launch) if arg == "--set"]
    assert "train.max_updates=100" in sets and "tracking.enabled=false" in sets and "train.init_from=" in sets
    assert f"train.output_dir={tmp_path / 'o'}/launch/run" in sets
    assert not (tmp_path / "o").exists(), "a dry run writes nothing"
    # Every step is announced on stderr, in order.
    assert [line.split("] ", 1)[1].split(" ")[0] for line in result.stderr.splitlines()] == [
        "install", "ZeRO-2", "plain", "bf16", "launch:", "summary"]


def test_dry_run_of_the_preparation_shows_the_wheel_and_shard_commands():
    result = gpu_check("--dry-run", "--prepare", "--python-version", "3.12")
    assert result.returncode == 0, result.stderr
    commands = planned_commands(result.stdout)
    (build,) = [c for c in commands if "wheel" in c]
    assert build[:2] == ["env", "DS_BUILD_OPS=0"] and "deepspeed==0.19.8" in build and "--no-deps" in build
    (download,) = [c for c in commands if "download" in c]
    assert download[download.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in download
    for needed in ("hjson", "pydantic>=2", "pydantic-core", "annotated-types", "typing-inspection", "webdataset==1.0.2",
                   "pyarrow==25.0.1", "safetensors>=0.6,<0.9", "pyyaml>=6,<7", "braceexpand"):
        assert needed in download, needed
    assert "torch==2.11.0" not in download  # the device image has it
    assert any(c[2:4] == ["jobs.cli", "make-sample-data"] for c in commands)
    (preprocess,) = [c for c in commands if "jobs.preprocess" in c]
    assert "data.shards.output=data/gpu-check/shards" in preprocess


def test_the_two_device_calls_install_then_check(tmp_path):
    """One call carries the wheels (pyarrow alone is 48 MiB of the 64 MiB a call carries), the next the shards."""
    result = gpu_check("--dry-run", "--install-only")
    assert result.returncode == 0, result.stderr
    (install,) = planned_commands(result.stdout)
    assert install[1:4] == ["-m", "pip", "install"]
    result = gpu_check("--dry-run", "--no-install")
    assert result.returncode == 0, result.stderr
    commands = planned_commands(result.stdout)
    assert not [c for c in commands if "pip" in c] and any("jobs/pretrain.py" in c for c in commands)
    assert gpu_check("--install-only", "--no-install").returncode == 2

    # --no-install needs no wheels (this venv has the stack), but the shards and a GPU.
    result = gpu_check("--no-install", "--wheels", str(tmp_path / "none"), "--shards", str(tmp_path / "none"))
    assert result.returncode == 2 and "no shard set" in result.stderr
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "dataset.json").write_text("{}")
    result = gpu_check("--no-install", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "o"))
    assert result.returncode == 3 and "no CUDA device" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument: --bogus"),
    (["--micro-batches", "12,,24"], "--micro-batches must be positive integers"),
    (["--micro-batches", "0"], "--micro-batches must be positive integers"),
    (["--updates", "5"], "--updates must be an integer >= 20"),
    (["--steps", "ten"], "--steps must be a positive integer"),
    (["--wheels"], "--wheels needs a value"),
    (["--python-version", "311"], "--python-version must look like 3.11"),
], ids=["unknown", "empty-item", "zero", "few-updates", "steps-word", "no-value", "python-version"])
def test_bad_arguments_exit_2(args, message):
    result = gpu_check("--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_missing_wheels_or_shards_and_no_cuda_are_refused_clearly(tmp_path):
    result = gpu_check("--wheels", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert f"no deepspeed wheel in '{tmp_path / 'none'}'" in result.stderr and "--prepare" in result.stderr

    wheels, shards = tmp_path / "wheels", tmp_path / "shards"
    wheels.mkdir()
    (wheels / "deepspeed-0.19.8-py3-none-any.whl").write_bytes(b"")
    result = gpu_check("--wheels", str(wheels), "--shards", str(shards), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and f"no shard set at '{shards}'" in result.stderr

    shards.mkdir()
    (shards / "dataset.json").write_text("{}")
    result = gpu_check("--wheels", str(wheels), "--shards", str(shards), "--out", str(tmp_path / "o"))
    assert result.returncode == 3 and "no CUDA device visible to torch" in result.stderr
    assert not (tmp_path / "o").exists(), "nothing ran"


def json_lines(path: Path) -> list[dict]:
    """The JSON lines of a benchmark's stdout (DeepSpeed prints build notes there too)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def write_launch(launch: Path, losses: list[float], waits: list[float], exit_code: int = 0) -> None:
    launch.mkdir(parents=True)
    (launch / "exit_code").write_text(f"{exit_code}\n")
    (launch / "metrics.jsonl").write_text("".join(
        json.dumps({"update": i + 1, "lr": 1e-4, "ema_decay": 0.999, "loss": loss}) + "\n" for i, loss in enumerate(losses)))
    (launch / "train.log").write_text("".join(
        f"2026-01-01 00:00:00,000 rank0 INFO jobs.pretrain: update {10 * (i + 1)} loss=1 lr=0.0001 ema_decay=0.999 "
        f"grad_norm=1 clips_per_s={100 + i} data_wait_fraction={wait:.5g} target_var=1 pred_var=1\n"
        for i, wait in enumerate(waits)) + "finished at update 100 (epoch 4)\n")


def summary(out: Path, *args: str) -> tuple[int, list[dict]]:
    result = subprocess.run([PYTHON, "-m", "benchmarks.gpu_check_summary", str(out), *args], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=60)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


def test_helpers_run_on_the_cpu_and_the_summary_puts_them_side_by_side(tmp_path):
    """The ZeRO-2 step through the DeepSpeed engine (gloo, one rank), the plain ViT reference and the precision
    check, each for real with tiny_stage2, then the summary over their lines and a passing launch."""
    out = tmp_path / "out"
    out.mkdir()
    runs = {
        "zero_step": ["--tiny", "--micro-batches", "3,6", "--modes", "eager", "--steps", "1", "--warmup", "1"],
        "vit_reference": ["--tiny", "--micro-batches", "3,6", "--modes", "eager", "--steps", "1", "--warmup", "0"],
        "precision_check": ["--tiny", "--clips", "3"],
    }
    for module, args in runs.items():
        result = subprocess.run([PYTHON, "-m", f"benchmarks.{module}", *args], cwd=tmp_path, env=env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        (out / f"{module}.jsonl").write_text(result.stdout)
    zero = json_lines(out / "zero_step.jsonl")
    assert [(r["mode"], r["micro_batch"], r["zero_stage"]) for r in zero] == [("eager", 3, 2), ("eager", 6, 2)]
    assert all(r["clips_per_s"] > 0 and r["flops_per_step"] > 0 for r in zero)
    reference = json_lines(out / "vit_reference.jsonl")
    # Same token counts as the SSLAM step: 2B x K student rows of CLS + visible patches.
    assert reference[0]["passes"]["student"]["sequences"] == zero[0]["student_rows"] == 2 * 3 * 2
    (precision,) = json_lines(out / "precision_check.jsonl")
    assert precision["ok"] and precision["relative_difference"] < 0.02

    write_launch(out / "launch", losses=[10.0 - 0.05 * i for i in range(100)], waits=[0.4] + [0.01] * 9)
    code, (launch, total) = summary(out)
    assert code == 0, total
    assert launch["checks"] == {"exit_0": True, "all_updates": True, "loss_falls": True, "data_wait": True}
    assert launch["max_data_wait_after_first_window"] == 0.01  # the first window (warm-up) is not judged
    assert total["ok"] and [(row["mode"], row["micro_batch"]) for row in total["step_vs_plain_vit"]] == [
        ("eager", 3), ("eager", 6)]
    assert total["step_vs_plain_vit"][0]["vit_clips_per_s"] == reference[0]["clips_per_s"]


def test_summary_fails_a_launch_that_waits_for_data_or_does_not_learn(tmp_path):
    write_launch(tmp_path / "launch", losses=[5.0] * 100, waits=[0.4, 0.01, 0.08] + [0.01] * 7)
    code, (launch, total) = summary(tmp_path)
    assert code == 1 and not total["ok"]
    assert launch["checks"]["data_wait"] is False and launch["max_data_wait_after_first_window"] == 0.08
    assert launch["checks"]["loss_falls"] is False
    assert total["checks"]["zero_step_lines"] is False, "no benchmark lines: failed, not skipped"

    write_launch(tmp_path / "short" / "launch", losses=[9.0 - 0.1 * i for i in range(40)], waits=[0.0] * 4,
                 exit_code=1)
    code, (launch, _) = summary(tmp_path / "short")
    assert code == 1 and launch["checks"]["exit_0"] is False and launch["checks"]["all_updates"] is False
