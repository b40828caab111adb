"""benchmarks/learning.py: --smoke end to end (events data, Ray preprocessing, three CPU pre-training runs per
padding mode, probes; one JSON line with every mAP in [0, 1], the label prior and the budget), and its refusal of a
work folder that holds an earlier run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.learning import EVAL_SETS, MODELS, NOT_AVAILABLE, SMOKE, main, padding_modes, poolings

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_prints_one_json_line_of_maps(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.learning", "--smoke", "--work-dir", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout[-2000:]
    report = json.loads(lines[0])

    modes = padding_modes()
    assert modes["reference"] is None
    expected = {(mode, pooling, eval_set) for mode in modes for pooling in poolings() for eval_set in EVAL_SETS}
    rows = {(row["padding"], row["pooling"], row["eval"]): row for row in report["rows"]}
    assert set(rows) == expected and len(report["rows"]) == len(expected)
    for (mode, pooling, eval_set), row in rows.items():
        if modes[mode] is not None:
            assert row["mAP"] == NOT_AVAILABLE and row["why"] == modes[mode]
            continue
        assert row["pooling_used"] == poolings()[pooling]
        assert set(row["mAP"]) == set(MODELS)
        assert all(0.0 <= value <= 1.0 for value in row["mAP"].values()), row
        assert row["beats_random"] == [m for m in MODELS[1:] if row["mAP"][m] > row["mAP"]["random"]]

    # The label prior of a multi-label mAP is the mean prevalence: 1 / classes-ish for mono, higher for mixtures.
    prior = report["label_prior"]
    assert set(prior) == set(EVAL_SETS)
    assert 0.0 < prior["mono"] < prior["poly"] < 1.0

    measured = [mode for mode, why in modes.items() if why is None]
    assert set(report["runs"]) == set(measured)
    for mode in measured:
        updates = {name: run["updates"] for name, run in report["runs"][mode].items()}
        assert updates == {"stage1": SMOKE["stage1_updates"], "stage2": SMOKE["extra_updates"],
                           "stage1_continued": SMOKE["extra_updates"]}
    budget = report["budget"]
    assert budget["updates"]["stage1"] == SMOKE["stage1_updates"]
    assert 0 < budget["seconds"]["total"] < 400
    assert report["config"]["smoke"] is True and report["data"]["profile"] == "events"
    assert report["data"]["samples"] > 0


def test_a_work_dir_holding_a_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Its runs would resume from the old checkpoints (train.resume=auto) and report untrained numbers."""
    (tmp_path / "reference").mkdir()
    assert main(["--smoke", "--work-dir", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["reference"]


def test_modes_choose_the_padding_modes_and_aware_runs_take_the_layer_norm_utterance_target(tmp_path: Path) -> None:
    from benchmarks.learning import data_section, parse_args, write_run_configs
    from jobs.train.config import load_config

    assert parse_args(["--modes", "aware"]).modes == ["aware"]
    assert parse_args([]).modes == ["reference", "aware"]
    data = data_section(tmp_path / "data", tmp_path / "shards", 1)
    for flags, aware_center in (([], "running"), (["--utterance-center", "batch"], "batch")):
        args = parse_args(["--smoke", *flags])
        for mode, utterance_norm, center in (("reference", "instance_norm", "none"),
                                             ("aware", "layer_norm", aware_center)):
            for path in write_run_configs(tmp_path / "work", data, mode, args).values():
                model = load_config(str(path)).model
                assert (model.padding, model.utterance_norm, model.utterance_center) == (mode, utterance_norm, center)


def test_micro_batch_clips_sets_the_loader_of_every_run(tmp_path: Path) -> None:
    from benchmarks.learning import data_section, parse_args, write_run_configs
    from jobs.train.config import load_config

    data = data_section(tmp_path / "data", tmp_path / "shards", 1)
    args = parse_args(["--smoke", "--micro-batch-clips", "12"])
    for mode in ("reference", "aware"):
        for path in write_run_configs(tmp_path / "work", data, mode, args).values():
            assert load_config(str(path)).data.loader.micro_batch_clips == 12, path


def test_runs_do_not_inherit_a_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both modes' runs start side by side: an inherited MASTER_PORT (e.g. left by an in-process single-rank run)
    would make them share one port, and the second fails with EADDRINUSE."""
    from benchmarks.learning import job_env

    monkeypatch.setenv("MASTER_PORT", "25000")
    monkeypatch.setenv("WORLD_SIZE", "1")
    env = job_env(1)
    assert "MASTER_PORT" not in env and "WORLD_SIZE" not in env
    assert env["OMP_NUM_THREADS"] == "1" and env["DS_ACCELERATOR"] == "cpu"
