"""`sslam finetune` end to end on generated labelled shards (tests/test_evaluate.py's sound events): a briefly
pre-trained tiny encoder registered as the source, fine-tuned on CPU with DeepSpeed; the result against the label
prior and the linear probe of the same encoder, the classifier version in the registry, resume after SIGTERM
(through a clip cache, jobs.train.finetune_cache), a 2-rank launch and the config refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from jobs.train import checkpointing

from jobs import cli

from jobs.mlops import registration, registry
from jobs.train.config import load_config
from jobs.evaluate import label_prior, train_probe
from jobs.train.metrics import mean_average_precision
from jobs.export import from_registry
from jobs.train.finetune_data import load_split
from jobs.mlops.client import mlflow_client
from model.build import build_encoder
from model.features import extract_features
from test_evaluate import CLEARED, PRETRAIN_STEPS, pretrain, register, write_evaluation_set
from test_pretrain_launch import cpu_env

SOURCE = "models:/sslam-encoder/1"
BASE = ["--config", "tiny_finetune", "--set", f"finetune.source={SOURCE}", "--set", "data.loader.shards=shards"]
# Measured on this data (see the report): fine-tuned 0.53, linear probe 0.46, label prior 0.13.
MARGIN_OVER_PROBE = 0.03
MARGIN_OVER_PRIOR = 0.25


def finetune_command(*extra: str, ranks: int = 1) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "finetune", "--ranks", str(ranks), *BASE, *extra]


def launch(root: Path, *extra: str, ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(finetune_command(*extra, ranks=ranks), cwd=root, env=cpu_env(), capture_output=True,
                          text=True, timeout=timeout)


def records(run_dir: Path, key: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def last_checkpoint(run_dir: Path) -> Path:
    return checkpointing.latest_complete(checkpointing.checkpoint_root(run_dir)).folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Data, the registered source encoder, its linear probe, and one uninterrupted fine-tuning run (registered)."""
    root = tmp_path_factory.mktemp("finetune")
    with pytest.MonkeyPatch.context() as patch:
        for name in CLEARED:
            patch.delenv(name, raising=False)
        patch.chdir(root)
        patch.setenv(registration.KEY_ENV, str(root / "keys" / "registration.key"))
        config = load_config("tiny_finetune", ["data.loader.shards=shards"])
        _, train_features = write_evaluation_set(root / "shards", config.data.audio)
        probe_config = load_config("probe", ["data.loader.num_workers=0"])
        source = register(pretrain(probe_config, train_features, PRETRAIN_STEPS), probe_config,
                          root / "runs" / "pretrained", PRETRAIN_STEPS)
        assert f"models:/{source.name}/{source.version}" == SOURCE
        train_set = load_split(config.data, "shards", "train")
        eval_set = load_split(config.data, "shards", "eval")
        encoder = build_encoder(from_registry(SOURCE).weights)
        features = {name: extract_features(encoder, split.fbank.float())["utterance"]
                    for name, split in (("train", train_set), ("eval", eval_set))}
        probe = train_probe(features["train"], train_set.labels, config.eval, multi_label=True)
        with torch.no_grad():
            probe_scores = torch.sigmoid(probe(features["eval"])).numpy()
        probe_map, _ = mean_average_precision(eval_set.labels.numpy(), probe_scores)
        prior_map, _ = mean_average_precision(eval_set.labels.numpy(),
                                              label_prior(train_set.labels, eval_set.labels.shape[0]))
        result = launch(root, "--set", "train.output_dir=runs/ft", "--set", "tracking.aliases=[finetuned]")
        assert result.returncode == 0, result.stderr[-3000:]
        yield SimpleNamespace(root=root, run=root / "runs" / "ft", probe_map=probe_map, prior_map=prior_map,
                              eval_set=eval_set)


def test_finetuning_beats_the_label_prior_and_the_linear_probe(trained):
    evals = records(trained.run, "eval_mAP")
    assert [r["update"] for r in evals] == [100, 200, 300, 400]
    best = max(r["eval_mAP"] for r in evals)
    assert best > trained.probe_map + MARGIN_OVER_PROBE, (best, trained.probe_map)
    assert best > trained.prior_map + MARGIN_OVER_PRIOR, (best, trained.prior_map)
    assert all(r["eval_baseline_mAP"] == pytest.approx(trained.prior_map) for r in evals)
    saved = json.loads((trained.run / "best" / "best.json").read_text())
    assert saved["metrics"]["mAP"] == pytest.approx(best)
    lrs = [r["lr"] for r in records(trained.run, "lr")]
    assert lrs[-1] < 0.05 * max(lrs)  # the x1 groups' cosine ends near min_lr


def test_the_best_checkpoint_is_a_registered_classifier_that_loads_and_predicts(trained):
    client = mlflow_client()
    version = client.get_model_version_by_alias("sslam-encoder-classifier", "finetuned")
    saved = json.loads((trained.run / "best" / "best.json").read_text())
    assert version.tags["kind"] == "finetune" and version.tags["update"] == str(saved["update"])
    assert float(version.tags["eval.mAP"]) == pytest.approx(saved["metrics"]["mAP"])
    assert float(version.tags["eval.baseline_mAP"]) == pytest.approx(trained.prior_map)
    assert client.get_run(version.run_id).data.tags["mlflow.source.name"] == "jobs.finetune"
    encoder_versions = client.search_model_versions("name = 'sslam-encoder'")
    assert len(encoder_versions) == 1  # fine-tuning registered no encoder
    _, exact, model = registry.load_verified("models:/sslam-encoder-classifier@finetuned",
                                             model_config={"device": "cpu"})
    python_model = model.unwrap_python_model()
    assert [c["mid"] for c in python_model.classes] == [c["mid"] for c in saved["classes"]]
    logits = python_model.embed(trained.eval_set.fbank[:20].float())["logits"]
    scores = torch.sigmoid(logits).numpy()
    value, _ = mean_average_precision(trained.eval_set.labels[:20].numpy(), scores)
    assert value > trained.prior_map  # the registered head is the trained one, not a fresh one


def test_sigterm_then_resume_ends_where_the_uninterrupted_run_ends(trained):
    root = trained.root
    run_dir = root / "runs" / "resumed"
    # Both halves read the train split through a clip cache (the first builds it, the resume reuses it): the
    # result must still be bit for bit the uninterrupted in-memory run's.
    extra = ["--set", "train.output_dir=runs/resumed", "--set", "tracking.enabled=false",
             "--set", "finetune.cache_dir=cache"]
    process = subprocess.Popen(finetune_command(*extra), cwd=root, env=cpu_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and any(r["update"] >= 130 for r in records(run_dir, "loss")):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    stopped = json.loads((last_checkpoint(run_dir) / checkpointing.RUN_STATE_FILE).read_text())
    assert 130 <= stopped["updates"] < 400
    assert stopped["best_update"] in (100, 200, 300)
    result = launch(root, *extra, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "reusing the clip cache" in result.stderr
    assert len([p for p in (root / "cache").iterdir() if p.is_dir()]) == 1
    final = last_checkpoint(run_dir)
    reference = last_checkpoint(trained.run)
    assert final.name == reference.name == "update_00000400"
    mine, theirs = load_file(str(final / checkpointing.STUDENT_FILE)), load_file(str(reference / checkpointing.STUDENT_FILE))
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    resumed_state = json.loads((final / checkpointing.RUN_STATE_FILE).read_text())
    reference_state = json.loads((reference / checkpointing.RUN_STATE_FILE).read_text())
    assert (resumed_state["best_map"], resumed_state["best_update"]) == (
        reference_state["best_map"], reference_state["best_update"])
    ours = {r["update"]: r["lr"] for r in records(run_dir, "lr")}
    reference_lrs = {r["update"]: r["lr"] for r in records(trained.run, "lr")}
    assert all(ours[u] == pytest.approx(reference_lrs[u], rel=1e-12) for u in reference_lrs)


def test_two_ranks_through_the_launcher(trained):
    result = launch(trained.root, "--set", "train.output_dir=runs/two", "--set", "tracking.enabled=false",
                    "--set", "train.max_updates=6", "--set", "finetune.eval_interval=3", "--set",
                    "train.warmup_updates=2", ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = trained.root / "runs" / "two"
    assert [r["update"] for r in records(run_dir, "eval_mAP")] == [3, 6]
    assert all(r["eval_eval_clips"] == 60 for r in records(run_dir, "eval_mAP"))  # both ranks' shares gathered
    state = json.loads((last_checkpoint(run_dir) / checkpointing.RUN_STATE_FILE).read_text())
    assert (state["world_size"], state["updates"], state["clips_per_update"]) == (2, 6, 24)


@pytest.mark.parametrize("overrides, message", [
    (["finetune.source="], "finetune.source is empty"),
    (["finetune.sampling=weighted"], "needs finetune.sample_weights"),
    (["finetune.clips_per_epoch=10"], "apply only to finetune.sampling=weighted"),
    (["finetune.layer_decay=1.5"], "finetune.layer_decay"),
    (["finetune.source=no/such/folder"], "not a models:/ URI"),
])
def test_config_refusals_exit_2_naming_the_problem(tmp_path, monkeypatch, overrides, message, capfd, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    sets = [item for o in overrides for item in ("--set", o)]
    code = cli.main(["finetune", *BASE, "--set", "train.output_dir=runs/refused", "--set", "tracking.enabled=false",
                     *sets])
    assert code == 2
    assert message in capfd.readouterr().err + caplog.text
