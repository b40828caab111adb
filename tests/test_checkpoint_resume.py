"""Checkpoint completeness and where a resume reads and writes (jobs.train.checkpointing, Pretrainer._resume_tag).

Unit level: the manifest catches every missing or truncated file, a same-size change only when re-hashing,
a folder without a manifest and DeepSpeed's `latest` naming a missing tag; DeepSpeed's files are hashed
while written. Through the launcher (2 CPU ranks, one source run): a resume from another run's
checkpoint writes only into its own output_dir, leaves the source byte-for-byte unchanged and continues each
rank's running CLS-target centre (losses and final centres equal the source's); a run whose
newer checkpoints are damaged one file kind each (and a newer partial folder, and a `latest` naming a
missing tag) continues from the newest complete one, and stage-2 `init_from` does the same; another
dataset fingerprint exits 2 naming both unless `train.allow_dataset_change`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from jobs.train import checkpointing
from test_pretrain_launch import (  # noqa: F401 (shards is a fixture)
    PRETRAIN, deepspeed_command, free_port, pretrain_args, read_jsonl, run, shards, single_rank_env,
)

# ---- unit level ------------------------------------------------------------------------------------------

FILES = {"mp_rank_00_model_states.pt": 300, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 500,
         "zero_pp_rank_1_mp_rank_00_optim_states.pt": 500, "student.safetensors": 200,
         "teacher.safetensors": 200, "optimizer.safetensors": 400, "config.yaml": 50, "run_state.json": 80}


def _folder(root: Path, updates: int) -> Path:
    folder = root / checkpointing.tag_for(updates)
    folder.mkdir(parents=True)
    for name, size in FILES.items():
        (folder / name).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    checkpointing.manifest_for_files(folder)
    return folder


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_missing_or_truncated_file_makes_a_folder_partial(tmp_path, name, damage):
    folder = _folder(tmp_path, 4)
    assert checkpointing.verify(folder) is None and checkpointing.verify(folder, rehash=True) is None
    path = folder / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    else:
        path.unlink()
    problem = checkpointing.verify(folder)
    assert problem is not None and name in problem


def test_same_size_damage_is_found_only_when_rehashing(tmp_path):
    folder = _folder(tmp_path, 4)
    path = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert checkpointing.verify(folder) is None
    assert "sha256" in checkpointing.verify(folder, rehash=True)


def test_the_newest_complete_checkpoint_is_chosen_and_each_skipped_one_is_named(tmp_path):
    _folder(tmp_path, 2)
    (_folder(tmp_path, 4) / "teacher.safetensors").unlink()
    partial = _folder(tmp_path, 6)
    (partial / checkpointing.MANIFEST_FILE).unlink()
    (tmp_path / "latest").write_text("update_00000099")
    choice = checkpointing.latest_complete(tmp_path)
    assert choice.folder == tmp_path / "update_00000002"
    reasons = dict(choice.skipped)
    assert sorted(reasons) == ["update_00000004", "update_00000006", "update_00000099"]
    assert "teacher.safetensors is missing" in reasons["update_00000004"]
    assert "no manifest.json" in reasons["update_00000006"]
    assert "no such folder" in reasons["update_00000099"]
    assert checkpointing.latest_tag(tmp_path) == "update_00000002"


def test_pruning_keeps_the_newest_complete_ones(tmp_path):
    for updates in (2, 4, 6):
        _folder(tmp_path, updates)
    (tmp_path / "update_00000006" / checkpointing.MANIFEST_FILE).unlink()  # being written
    checkpointing.prune(tmp_path, keep=1)
    assert checkpointing.list_tags(tmp_path) == ["update_00000004", "update_00000006"]


def test_the_recording_engine_hashes_what_torch_save_writes(tmp_path):
    class Inner:
        zipfile_serialization = False

    engine = checkpointing.RecordingCheckpointEngine(Inner())
    state = {"w": torch.randn(1000), "step": 3, "nested": {"m": torch.arange(10)}}
    engine.save(state, str(tmp_path / "states.pt"))
    data = (tmp_path / "states.pt").read_bytes()
    assert engine.records["states.pt"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    loaded = torch.load(tmp_path / "states.pt", weights_only=False)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3


# ---- through the launcher ------------------------------------------------------------------------------

LAUNCH_TIMEOUT_S = 900  # ~30-60 s alone; generous for a 2-core machine shared by many test runs
# A running CLS-target centre (model/utterance_centre.py) is state outside the engine: a resume must restore it.
SETTINGS = ("train.checkpoint_interval=2", "train.keep_checkpoints=10", "train.record_samples=true",
            "train.log_interval=100", "train.clips_per_update=12", "model.utterance_center=running")


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source_run(shards, tmp_path_factory) -> Path:
    """2 ranks, 14 updates, a checkpoint every 2 (all kept)."""
    output = tmp_path_factory.mktemp("source") / "run"
    result = run(deepspeed_command(*pretrain_args(shards, output, *SETTINGS, "train.max_updates=14")), output.parent,
                 timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def by_update(path: Path) -> dict[int, dict]:
    return {m["update"]: m for m in read_jsonl(path)}


def assert_same_updates(resumed: Path, source: Path, updates: range) -> None:
    got, want = by_update(resumed / "metrics.jsonl"), by_update(source / "metrics.jsonl")
    assert sorted(got) == list(updates)
    for update in updates:
        assert got[update]["lr"] == want[update]["lr"]
        assert got[update]["loss"] == pytest.approx(want[update]["loss"], rel=1e-4), update
    for rank in (0, 1):
        keys = {r["update"]: r["keys"] for r in read_jsonl(resumed / f"samples_rank{rank}.jsonl")}
        source_keys = {r["update"]: r["keys"] for r in read_jsonl(source / f"samples_rank{rank}.jsonl")}
        assert keys == {u - 1: source_keys[u - 1] for u in updates}  # keys are recorded under the update in progress


@pytest.mark.slow
def test_a_resume_from_another_run_writes_only_into_its_own_folder(source_run, shards, tmp_path):
    before = digest(source_run)
    output = tmp_path / "elsewhere"
    resume = checkpointing.checkpoint_root(source_run) / "update_00000004"
    args = pretrain_args(shards, output, *SETTINGS, "train.max_updates=14", "train.keep_checkpoints=1",
                         f"train.resume={resume}")
    result = run(deepspeed_command(*args), tmp_path, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert digest(source_run) == before  # nothing written, nothing pruned
    root = checkpointing.checkpoint_root(output)
    assert checkpointing.list_tags(root) == ["update_00000014"]
    assert checkpointing.verify(root / "update_00000014", rehash=True) is None
    assert_same_updates(output, source_run, range(5, 15))
    centres = checkpointing.read_run_state(root / "update_00000014")["utterance_centre"]
    source_root = checkpointing.checkpoint_root(source_run)
    source_centres = checkpointing.read_run_state(source_root / "update_00000014")["utterance_centre"]
    assert len(source_centres) == 2 and source_centres[0] != source_centres[1]  # one per rank
    for got, want in zip(centres, source_centres):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-6)


def damage(root: Path) -> dict[str, str]:
    """Damage one file kind in each of the six newest checkpoints, add a newer partial folder and point
    `latest` at a tag that does not exist; returns {tag: the file damaged}."""
    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    damaged = {
        "update_00000014": ("mp_rank_00_model_states.pt", truncate),
        "update_00000012": ("zero_pp_rank_0_mp_rank_00_optim_states.pt", Path.unlink),
        "update_00000010": ("zero_pp_rank_1_mp_rank_00_optim_states.pt", truncate),
        "update_00000008": ("student.safetensors", truncate),
        "update_00000006": ("teacher.safetensors", Path.unlink),
        "update_00000004": ("config.yaml", truncate),
    }
    for tag, (name, change) in damaged.items():
        change(root / tag / name)
    partial = root / "update_00000016"
    shutil.copytree(root / "update_00000014", partial)
    (partial / checkpointing.MANIFEST_FILE).unlink()
    (root / "latest").write_text("update_00000099")
    return {tag: name for tag, (name, _) in damaged.items()}


@pytest.mark.slow
def test_damaged_newer_checkpoints_are_skipped_by_resume_and_init_from(source_run, shards, tmp_path):
    output = tmp_path / "damaged"
    shutil.copytree(source_run, output)
    root = checkpointing.checkpoint_root(output)
    damaged = damage(root)

    stage2 = [sys.executable, PRETRAIN, "--config", "tiny_stage2", "--set", f"data.loader.shards={shards}",
              "--set", f"train.output_dir={tmp_path / 'stage2'}", "--set", "data.loader.num_workers=0",
              "--set", "tracking.enabled=false", "--set", "train.max_updates=2", "--set", f"train.init_from={output}"]
    result = run(stage2, tmp_path, timeout=LAUNCH_TIMEOUT_S, **single_rank_env(free_port()))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert f"initialised student and teacher from {root / 'update_00000002'}" in log

    args = pretrain_args(shards, output, *SETTINGS, "train.max_updates=14")
    result = run(deepspeed_command(*args, "--resume"), tmp_path, timeout=LAUNCH_TIMEOUT_S)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert f"resumed from update_00000002 at update 2 (epoch 0) of {root}" in log
    for name in damaged.values():
        assert name in log  # each skipped checkpoint is named with the file that makes it partial
    for tag in [*damaged, "update_00000016", "update_00000099"]:
        assert f"skipping checkpoint {root / tag}" in log
    # metrics.jsonl of the copy holds the source's 14 updates, then the resumed 3..14.
    resumed = {m["update"]: m for m in read_jsonl(output / "metrics.jsonl")[14:]}
    source = by_update(source_run / "metrics.jsonl")
    assert sorted(resumed) == list(range(3, 15))
    for update, record in resumed.items():
        assert record["lr"] == source[update]["lr"]
        assert record["loss"] == pytest.approx(source[update]["loss"], rel=1e-4)
    assert checkpointing.latest_tag(root) == "update_00000014"  # rewritten complete; update_00000016 stays partial
    assert checkpointing.verify(root / "update_00000016") is not None


@pytest.mark.slow
def test_another_dataset_fingerprint_exits_2_unless_allowed(source_run, shards, tmp_path):
    changed = tmp_path / "changed_shards"
    shutil.copytree(shards, changed)
    info = json.loads((changed / "dataset.json").read_text())
    info["fingerprint"] = "synthetic-rebuilt"
    (changed / "dataset.json").write_text(json.dumps(info))
    resume = checkpointing.checkpoint_root(source_run) / "update_00000004"
    args = pretrain_args(changed, tmp_path / "out", *SETTINGS, "train.max_updates=5", f"train.resume={resume}")

    refused = run([sys.executable, *args], tmp_path, timeout=LAUNCH_TIMEOUT_S, **single_rank_env(free_port()))
    log = refused.stdout + refused.stderr
    assert refused.returncode == 2, log[-3000:]
    assert "'synthetic-0'" in log and "'synthetic-rebuilt'" in log and "train.allow_dataset_change" in log
    assert not (tmp_path / "out" / "checkpoints").exists()

    allowed = run([sys.executable, *args, "--set", "train.allow_dataset_change=true"], tmp_path,
                  timeout=LAUNCH_TIMEOUT_S, **single_rank_env(free_port()))
    log = allowed.stdout + allowed.stderr
    assert allowed.returncode == 0, log[-3000:]
    assert "differs from the checkpoint's 'synthetic-0'" in log
    assert [m["update"] for m in read_jsonl(tmp_path / "out" / "metrics.jsonl")] == [5]
