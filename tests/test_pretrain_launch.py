"""The pre-training job through the real `deepspeed` launcher on CPU ranks (gloo, OMP_NUM_THREADS=1).

Scenarios: ZeRO 1/2/3 x stages 1 and 2 train and agree; a SIGKILLed run resumes exactly; SIGTERM
checkpoints and exits 0; `sslam pretrain --ranks 2` launches in bf16 (fp32 position table) and cleans
/dev/shm; two "nodes" (`--no_ssh --node_rank`) train together; mismatched data is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.train import checkpointing
from shardsets import write_training_set

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRETRAIN = str(REPO / "jobs" / "pretrain.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(**extra: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    env.update(extra)
    return env


def deepspeed_command(*args: str, ranks: int = 2) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *args]


def run(command: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=cpu_env(**env), capture_output=True, text=True, timeout=timeout)
    return result


NATIVE_ABORT = "terminate called without an active exception"


def run_again_after_native_abort(command: list[str], cwd: Path, output_dir: Path, timeout: int) -> subprocess.CompletedProcess:
    """One CI run saw a rank abort inside native code (no Python error) seconds into this launch; 15 launches
    under CPU stress did not reproduce it. Such a launch is repeated once, from scratch on a fresh port; any
    other failure, or a second abort, fails the test."""
    result = run(command, cwd, timeout=timeout)
    if result.returncode != 0 and NATIVE_ABORT in result.stderr:
        shutil.rmtree(output_dir, ignore_errors=True)
        port = command.index("--master_port") + 1
        command = [*command[:port], str(free_port()), *command[port + 1:]]
        result = run(command, cwd, timeout=timeout)
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_tag(output_dir: Path) -> Path:
    root = checkpointing.checkpoint_root(output_dir)
    return root / checkpointing.latest_tag(root)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("shards")
    write_training_set(directory, target_length=512, mel_bins=64, num_shards=3, groups_per_shard=8)
    return directory


def pretrain_args(shards: Path, output_dir: Path, *overrides: str) -> list[str]:
    args = [PRETRAIN, "--config", "tiny_stage1", "--set", f"data.loader.shards={shards}",
            "--set", f"train.output_dir={output_dir}", "--set", "data.loader.num_workers=0",
            "--set", "tracking.enabled=false"]
    for override in overrides:
        args += ["--set", override]
    return args


def test_zero_stages_train_and_their_teachers_agree(shards, tmp_path):
    out = tmp_path / "zero"
    command = deepspeed_command(str(REPO / "tests" / "zero_stages_driver.py"), "--shards", str(shards), "--out", str(out))
    result = run_again_after_native_abort(command, tmp_path, out, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    teachers = {}
    for zero in (1, 2, 3):
        for stage in (1, 2):
            run_dir = out / f"zero{zero}" / f"stage{stage}"
            metrics = read_jsonl(run_dir / "metrics.jsonl")
            losses = [m["loss"] for m in metrics]
            assert losses[-1] < losses[0], (zero, stage, losses)
            assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, (zero, stage, losses)
            teachers[zero, stage] = load_file(str(final_tag(run_dir) / "teacher.safetensors"))
            # The student gathered from the master copies equals DeepSpeed's own consolidation of the files.
            student = load_file(str(final_tag(run_dir) / "student.safetensors"))
            consolidated = checkpointing.consolidated_student(final_tag(run_dir).parent, final_tag(run_dir).name)
            assert sorted(student) == sorted(consolidated)
            for name, tensor in consolidated.items():
                torch.testing.assert_close(student[name], tensor, rtol=0, atol=0, msg=name)
            if stage == 2:  # §10 resets: update count, LR warm-up from 0, EMA schedule from u = 0
                assert metrics[0]["update"] == 1 and metrics[0]["lr"] == 0.0
                assert metrics[0]["ema_decay"] == pytest.approx(0.99 - (0.99 - 0.9) * (1 - 1 / 100))
    initial = load_file(str(final_tag(out / "zero2" / "stage1") / "teacher.safetensors"))
    moved = max((teachers[2, 2][k] - initial[k]).abs().max().item() for k in initial if k != "pos_embed")
    assert moved > 1e-3  # stage 2 really moved its teacher
    for stage in (1, 2):
        reference = teachers[2, stage]
        for zero in (1, 3):
            for name, tensor in reference.items():
                torch.testing.assert_close(teachers[zero, stage][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_sigkill_then_resume_continues_exactly(shards, tmp_path):
    settings = ("train.max_updates=20", "train.checkpoint_interval=4", "train.keep_checkpoints=10",
                "train.record_samples=true", "train.log_interval=100")
    reference = tmp_path / "reference"
    result = run(deepspeed_command(*pretrain_args(shards, reference, *settings)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        deepspeed_command(*pretrain_args(shards, interrupted, *settings)), cwd=tmp_path, env=cpu_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    root = checkpointing.checkpoint_root(interrupted)
    deadline = time.monotonic() + 240
    while not (root / "update_00000004" / checkpointing.MANIFEST_FILE).exists():  # written last
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = checkpointing.latest_tag(root)
    assert killed_at is not None and killed_at < "update_00000020"

    result = run(deepspeed_command(*pretrain_args(shards, interrupted, *settings), "--resume"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr

    expected = {m["update"]: m for m in read_jsonl(reference / "metrics.jsonl")}
    resumed = {m["update"]: m for m in read_jsonl(interrupted / "metrics.jsonl")}  # later lines win
    assert sorted(resumed) == sorted(expected) == list(range(1, 21))
    for update, record in expected.items():
        assert resumed[update]["lr"] == record["lr"] and resumed[update]["ema_decay"] == record["ema_decay"]
        assert resumed[update]["loss"] == pytest.approx(record["loss"], rel=1e-4)
    for rank in (0, 1):
        seen = {r["update"]: r["keys"] for r in read_jsonl(reference / f"samples_rank{rank}.jsonl")}
        again = {r["update"]: r["keys"] for r in read_jsonl(interrupted / f"samples_rank{rank}.jsonl")}
        assert again == seen
    final_reference, final_resumed = final_tag(reference), final_tag(interrupted)
    for name, tensor in load_file(str(final_reference / "teacher.safetensors")).items():
        torch.testing.assert_close(load_file(str(final_resumed / "teacher.safetensors"))[name], tensor, rtol=1e-4, atol=1e-6)
    student = checkpointing.consolidated_student(final_reference.parent, final_reference.name)
    student_resumed = checkpointing.consolidated_student(final_resumed.parent, final_resumed.name)
    for name, tensor in student.items():
        torch.testing.assert_close(student_resumed[name], tensor, rtol=1e-4, atol=1e-6)


def single_rank_env(port: int) -> dict:
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def test_sigterm_writes_a_checkpoint_and_exits_zero(shards, tmp_path):
    output = tmp_path / "preempted"
    command = [sys.executable, *pretrain_args(shards, output, "train.max_updates=100000", "train.checkpoint_interval=100000",
                                              "train.gradient_accumulation=3", "train.record_samples=true")]
    process = subprocess.Popen(command, cwd=tmp_path, env=cpu_env(**single_rank_env(free_port())),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = output / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-3000:]
    tag = checkpointing.latest_tag(checkpointing.checkpoint_root(output))
    assert tag is not None and int(tag.split("_")[1]) >= 3
    assert "SIGTERM" in out
    # The stop waits for the accumulation boundary: every consumed micro-batch belongs to a finished update.
    updates = len(read_jsonl(metrics))
    assert updates == int(tag.split("_")[1])
    assert len(read_jsonl(output / "samples_rank0.jsonl")) == 3 * updates


def test_sslam_pretrain_ranks_in_bf16_keeps_the_position_table_and_leaves_no_shared_memory(shards, tmp_path):
    """`sslam pretrain --ranks 2` goes through the deepspeed launcher and removes the ranks' /dev/shm buffers.
    Under bf16 DeepSpeed casts parameters, not buffers: the exported student's fixed sin-cos table stays fp32 and
    equal to the fp32 teacher's."""
    buffers = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    output = tmp_path / "cli"
    overrides = pretrain_args(shards, output, "train.max_updates=2", "train.precision=bf16")[1:]
    result = run([str(BIN / "sslam"), "pretrain", "--ranks", "2", *overrides], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = checkpointing.checkpoint_root(output) / "update_00000002"
    assert len(list(folder.glob("*zero_pp_rank_*_optim_states.pt"))) == 2  # two ranks trained
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) == buffers
    student = load_file(str(folder / "student.safetensors"))
    teacher = load_file(str(folder / "teacher.safetensors"))
    assert student["encoder.pos_embed"].dtype == torch.float32
    assert torch.equal(student["encoder.pos_embed"], teacher["pos_embed"])


def test_two_nodes_train_together_and_write_one_checkpoint(shards, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    output = tmp_path / "two_nodes"
    nodes = [
        subprocess.Popen(
            [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
             "--master_addr", "127.0.0.1", "--master_port", port,
             *pretrain_args(shards, output, "train.max_updates=6", "train.checkpoint_interval=6")],
            cwd=tmp_path, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    tags = checkpointing.list_tags(checkpointing.checkpoint_root(output))
    assert tags == ["update_00000006"]
    folder = checkpointing.checkpoint_root(output) / tags[0]
    assert sorted(p.name for p in folder.glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_dataset_mismatch_is_refused_before_any_step(shards, tmp_path):
    output = tmp_path / "mismatch"
    command = [sys.executable, *pretrain_args(shards, output, "data.mixing.group_size=2")]
    result = run(command, tmp_path, **single_rank_env(free_port()))
    assert result.returncode == 2
    assert "group_size: dataset 3 != config 2" in result.stdout + result.stderr
    assert not (output / "metrics.jsonl").exists() or not (output / "metrics.jsonl").read_text()


def test_non_finite_loss_stops_with_the_update_and_sample_keys(shards, tmp_path):
    # A tiny normalisation std (zero is refused at load) turns every input into inf: the first loss is NaN.
    command = [sys.executable, *pretrain_args(shards, tmp_path / "nan", "model.norm_std=1.0e-45")]
    result = run(command, tmp_path, **single_rank_env(free_port()))
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    assert "non-finite loss at update 0" in output and "sample keys on rank 0: ['train-e00-" in output


def test_collapse_guard_stops_with_a_clear_message(shards, tmp_path):
    command = [sys.executable, *pretrain_args(shards, tmp_path / "collapse", "train.min_target_var=100.0")]
    result = run(command, tmp_path, **single_rank_env(free_port()))
    assert result.returncode == 3
    assert "collapse guard: target variance" in result.stdout + result.stderr
