"""Bad stage-1 sources through the training job's `train.init_from` (stage 2 started by `python jobs/pretrain.py`
as rank 0 of 1) and bad files through `model.official.import_official`.

Sources: official-format files (tests/test_checkpoint.py's synthetic EAT checkpoint) with a missing key, an extra
key, a shape that does not fit the configured model, a pickle that would run code, a truncated zip; and stage-1
run folders in the ZeRO-0 layout that jobs.train.checkpointing.consolidated_student reads, written for another model
size, without their teacher, or with a pickle that would run code. The valid file and the valid folder train
(controls). A bad source must stop the job before any update with exit 2 and a line naming the keys / the file /
the `trusted` option, and a malicious pickle must never run. Key-level checks of import_official itself
(missing/extra/wrong-shape keys, a zip pickle that runs code) are in tests/test_checkpoint.py.
"""

from __future__ import annotations

import os
import pickle
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from jobs.train import checkpointing
from jobs.train.config import load_config
from model.checkpoint import CheckpointError
from model.official import import_official
from model.sslam import SSLAM
from reliability_support import PRETRAIN, PYTHON, assert_clean_failure, run_command, single_rank_env
from shardsets import write_training_set
from test_checkpoint import IMAGE, pretrain_checkpoint

T, F = 128, 32
# tiny_stage2 at the synthetic official file's geometry: D=32, 2 blocks, 8 time patches x 2 frequency patches.
STAGE2 = ["data.audio.target_length=128", "data.audio.mel_bins=32", "model.target_length=128", "model.mel_bins=32",
          "model.max_time_patches=8", "data.loader.num_workers=0", "tracking.enabled=false",
          "train.max_updates=2", "train.checkpoint_interval=2"]


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _official(path: Path, change=None) -> Path:
    checkpoint = pretrain_checkpoint()
    if change is not None:
        change(checkpoint)
    torch.save(checkpoint, path)
    return path


def _stage1_folder(root: Path, overrides: list[str], teacher: bool = True, payload: Payload | None = None) -> Path:
    """A stage-1 run folder: checkpoints/update_00000001/{mp_rank_00_model_states.pt, student.safetensors,
    teacher.safetensors}, holding a fresh SSLAM of the config tiny_stage1 + STAGE2 + overrides."""
    model = SSLAM(load_config("tiny_stage1", STAGE2 + overrides).model)
    tag = root / "checkpoints" / "update_00000001"
    tag.mkdir(parents=True)
    states = {"module": model.state_dict()}
    if payload is not None:
        states["payload"] = payload
    torch.save(states, tag / "mp_rank_00_model_states.pt")  # never read by init_from (safetensors only)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tag / "student.safetensors"))
    if teacher:
        save_file({k: v.contiguous() for k, v in model.teacher.state_dict().items()}, str(tag / "teacher.safetensors"))
    checkpointing.manifest_for_files(tag)  # complete: init_from takes only checkpoints whose manifest verifies
    return root


def _truncated(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def stage2_runs(tmp_path_factory) -> dict[str, SimpleNamespace]:
    """Every scenario's stage-2 run (two at a time): {name: (result, output dir, source, marker)}."""
    tmp = tmp_path_factory.mktemp("stage2")
    shards = tmp / "shards"
    write_training_set(shards, T, F, num_shards=1, groups_per_shard=4)
    markers = {name: tmp / f"pwned-{name}" for name in ("official_pickle", "folder_pickle")}
    (tmp / "empty_run").mkdir()
    good_file = _official(tmp / "official.pt")
    sources = {
        "official_valid": (good_file, []),
        "official_missing_key": (_official(tmp / "missing.pt", lambda c: c["model"].pop(
            IMAGE + "context_encoder.norm.bias")), []),
        "official_extra_key": (_official(tmp / "extra.pt", lambda c: c["model"].__setitem__(
            IMAGE + "alibi_scale", torch.zeros(1))), []),
        "official_wrong_shape": (good_file, ["model.max_time_patches=16"]),
        "official_pickle": (_official(tmp / "evil.pt", lambda c: c["extra_state"].__setitem__(
            "payload", Payload(markers["official_pickle"]))), []),
        "official_truncated": (_truncated(tmp / "truncated.pt", good_file), []),
        "folder_valid": (_stage1_folder(tmp / "stage1_valid", []), []),
        "folder_wrong_size": (_stage1_folder(tmp / "stage1_wide", ["model.embed_dim=48", "model.decoder_dim=48"]),
                              []),
        "folder_without_teacher": (_stage1_folder(tmp / "stage1_no_teacher", [], teacher=False), []),
        "folder_pickle": (_stage1_folder(tmp / "stage1_evil", [], payload=Payload(markers["folder_pickle"])), []),
        "folder_without_checkpoints": (tmp / "empty_run", []),
    }

    def run(name: str) -> SimpleNamespace:
        source, overrides = sources[name]
        output = tmp / f"out-{name}"
        settings = [*STAGE2, *overrides, f"data.loader.shards={shards}", f"train.output_dir={output}",
                    f"train.init_from={source}"]
        command = [PYTHON, PRETRAIN, "--config", "tiny_stage2", *[f"--set={s}" for s in settings]]
        try:
            result = run_command(command, cwd=tmp, env=single_rank_env(), timeout=240)
        except subprocess.TimeoutExpired as error:
            result = subprocess.CompletedProcess(command, -1, str(error.stdout), f"timed out: {error}")
        return SimpleNamespace(result=result, output=output, source=source, marker=markers.get(name))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(sources, pool.map(run, sources)))


def _updates(output: Path) -> int:
    metrics = output / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


@pytest.mark.parametrize("name", ["official_valid", "folder_valid"])
def test_valid_sources_train(stage2_runs, name):
    """Control. Tried: stage 2 from the valid official file and from the valid stage-1 folder. Survives: exit 0
    after the configured 2 updates (so the failures below come from the damage, not the setup)."""
    run = stage2_runs[name]
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    assert _updates(run.output) == 2


BAD_SOURCES = ["official_missing_key", "official_extra_key", "official_wrong_shape", "official_pickle",
               "official_truncated", "folder_wrong_size", "folder_without_teacher", "folder_without_checkpoints"]


@pytest.mark.parametrize("name", BAD_SOURCES)
def test_a_bad_source_trains_nothing(stage2_runs, name):
    """Tried: each bad source. Survives: the job stops before the engine steps: non-zero exit, no update
    recorded, no checkpoint written."""
    run = stage2_runs[name]
    assert run.result.returncode != 0
    assert _updates(run.output) == 0
    assert not (run.output / "checkpoints").exists()


# One needle set per bad source (all on one stderr line).
EXIT_2_NEEDLES = {
    "official_missing_key": [IMAGE + "context_encoder.norm.bias"],
    "official_extra_key": [IMAGE + "alibi_scale"],
    "official_wrong_shape": ["pos_embed: checkpoint [1, 16, 32] vs model [1, 32, 32]"],
    "official_pickle": ["trusted"],
    "official_truncated": ["{source}"],
    "folder_wrong_size": ["decoder.proj.weight"],
    "folder_without_teacher": ["teacher.safetensors"],
    "folder_without_checkpoints": ["train.init_from: no checkpoint under", "{source}"],
}


@pytest.mark.parametrize("name", BAD_SOURCES)
def test_a_bad_source_exits_2_naming_the_problem(stage2_runs, name):
    """Tried: each bad source. Survives: exit 2 with one line naming the offending keys / file / option,
    and no traceback."""
    run = stage2_runs[name]
    assert_clean_failure(run.result, 2, *(needle.format(source=run.source) for needle in EXIT_2_NEEDLES[name]))


def test_an_official_pickle_that_runs_code_never_runs(stage2_runs):
    """Tried: init_from an official file whose extra_state unpickles to os.system. Survives: the command
    never ran (no marker file)."""
    assert not stage2_runs["official_pickle"].marker.exists()


def test_a_stage1_folder_pickle_that_runs_code_never_runs(stage2_runs):
    """Tried: init_from a stage-1 folder whose model-states file unpickles to os.system. Survives: the command
    never ran (no marker file)."""
    assert not stage2_runs["folder_pickle"].marker.exists()


# ------------------------------------------------------------------------------------ import_official itself


def test_a_legacy_format_pickle_that_runs_code_is_refused(tmp_path):
    """Tried: import_official on a payload saved in torch's legacy (non-zip) format and as a raw pickle.
    Survives: CheckpointError naming the file and the `trusted` option; the command never ran."""
    marker = tmp_path / "pwned"
    checkpoint = pretrain_checkpoint()
    checkpoint["extra_state"]["payload"] = Payload(marker)
    legacy, raw = tmp_path / "legacy.pt", tmp_path / "raw.pkl"
    torch.save(checkpoint, legacy, _use_new_zipfile_serialization=False)
    raw.write_bytes(pickle.dumps(checkpoint, protocol=2))
    for path in (legacy, raw):
        with pytest.raises(CheckpointError, match="trusted=True") as error:
            import_official(path)
        assert str(path) in str(error.value)
    assert not marker.exists()


def test_a_truncated_official_file_is_a_checkpoint_error(tmp_path):
    """Tried: import_official on the first half of a valid file. Survives: CheckpointError naming the file."""
    path = _truncated(tmp_path / "cut.pt", _official(tmp_path / "whole.pt"))
    with pytest.raises(CheckpointError, match="cut.pt"):
        import_official(path)
