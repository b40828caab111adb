"""Polyphonic evaluation: mixture drawing and equal-loudness sums (pipeline.polyphonic), and `sslam evaluate`
with eval.polyphonic on generated clips whose audio a folder source lists: poly2/poly3 mAP and baselines on the
run, the version and the version's logged model, and the per-class AP table."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from jobs import evaluate as evaluate_job
from jobs.train.config import load_config
from jobs.train.polyphonic_eval import manifest_test_clips
from jobs.mlops.client import mlflow_client
from model.sslam import SSLAM
from pipeline.config import AudioConfig
from pipeline.polyphonic import PEAK_LIMIT, draw_mixtures, equal_loudness_sum, rms, union_labels
from test_evaluate import CLEARED, CLIPS, MODEL, NUM_CLASSES, register, write_evaluation_set

LABELS = [[0], [1], [0, 2], [3], [1, 4], [5], [2], [4, 5], [6], [0, 6]]
MIXTURES = 40


def test_mixtures_have_sources_of_different_classes_and_are_seeded():
    for sources in (2, 3):
        mixtures = draw_mixtures(LABELS, 30, sources, seed=7)
        assert len(mixtures) == 30 and all(len(set(m)) == sources for m in mixtures)
        for mixture in mixtures:
            seen = [k for index in mixture for k in LABELS[index]]
            assert len(seen) == len(set(seen))  # no class in two sources
            assert union_labels(LABELS, mixture) == sorted(seen)
        assert draw_mixtures(LABELS, 30, sources, seed=7) == mixtures
        assert draw_mixtures(LABELS, 30, sources, seed=8) != mixtures


def test_too_few_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 3 classes"):
        draw_mixtures([[0], [1], [0, 1], [1]], 5, 3, seed=0)
    with pytest.raises(ValueError, match="disjoint labels"):
        draw_mixtures([[0, 1], [1, 2], [0, 2]], 5, 2, seed=0)  # three classes, but every pair shares one


def test_sources_are_summed_at_equal_rms_and_the_peak_is_guarded():
    cfg = AudioConfig()
    rng = np.random.default_rng(0)
    quiet = torch.from_numpy(0.01 * rng.standard_normal(16000).astype(np.float32)) + 0.3  # DC offset removed
    loud = torch.from_numpy(0.4 * rng.standard_normal(24000).astype(np.float32))
    mixture = equal_loudness_sum([quiet, loud], cfg)
    assert mixture.numel() == 24000
    alone = mixture[16000:]  # only the loud source, scaled to the quiet one's RMS
    assert rms(alone) == pytest.approx(rms(quiet), rel=0.05)
    assert rms(mixture[:16000]) == pytest.approx(np.sqrt(2) * rms(quiet), rel=0.05)
    clipped = equal_loudness_sum([loud * 5, loud.flip(0) * 5], cfg)
    assert float(clipped.abs().max()) == pytest.approx(PEAK_LIMIT, abs=1e-6)
    with pytest.raises(ValueError, match="silent"):
        equal_loudness_sum([quiet, torch.zeros(8000)], cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("polyphonic")
    with pytest.MonkeyPatch.context() as patch:
        for name in CLEARED:
            patch.delenv(name, raising=False)
        patch.chdir(root)
        source = json.dumps([{"name": "eval", "csv": str(root / "audio" / "eval.csv"), "mix": False}])
        config = load_config("probe", [
            "eval.train_shards=shards", "eval.test_shards=shards", "data.loader.num_workers=0",
            "data.loader.shards=shards", "data.source.kind=folder", "data.source.class_labels_csv=", "data.source.audio_root=", f"data.source.audio_roots=[{root / 'audio'}]",
            f"data.source.splits={source}", "eval.polyphonic.enabled=true", f"eval.polyphonic.mixtures={MIXTURES}",
            "eval.epochs=30"])
        info, _ = write_evaluation_set(root / "shards", config.data.audio, audio_dir=root / "audio")
        version = register(SSLAM(config.model), config, root / "runs" / "random", 0)
        yield SimpleNamespace(root=root, config=config, info=info, version=version)


def test_evaluate_scores_mono_and_polyphonic_and_logs_them_on_the_logged_model(setup):
    client = mlflow_client()
    results = evaluate_job.evaluate(f"models:/{MODEL}/{setup.version.version}", "shards", "shards", setup.config)
    assert results["protocol"] == "probe" and results["num_test"] == CLIPS["eval"]
    for name in ("poly2", "poly3"):
        assert results[f"{name}_mixtures"] == MIXTURES
        assert 0.0 < results[f"{name}_mAP"] <= 1.0 and 0.0 < results[f"{name}_baseline_mAP"] < 1.0
    # More sources, more positives per class: the label prior (mean prevalence) rises with the source count.
    assert results["baseline_mAP"] < results["poly2_baseline_mAP"] < results["poly3_baseline_mAP"]
    tags = client.get_model_version(MODEL, setup.version.version).tags
    for key in ("mAP", "poly2_mAP", "poly3_mAP", "poly2_baseline_mAP", "poly3_baseline_mAP"):
        assert float(tags[f"eval.{key}"]) == pytest.approx(results[key], abs=1e-6)
    logged = client.get_logged_model(evaluate_job.logged_model_id(setup.version))
    on_model = {metric.key: metric.value for metric in logged.metrics or []}
    for key in ("mAP", "baseline_mAP", "poly2_mAP", "poly3_mAP", "poly3_baseline_mAP"):
        assert on_model[key] == pytest.approx(results[key])
    assert all(metric.run_id == results["run_id"] for metric in logged.metrics if metric.key == "poly2_mAP")
    path = client.download_artifacts(results["run_id"], evaluate_job.PER_CLASS_TABLE, str(setup.root))
    rows = list(csv.DictReader(io.StringIO(open(path).read())))
    assert [row["mid"] for row in rows] == [c["mid"] for c in setup.info["classes"]]
    assert len(rows) == NUM_CLASSES
    assert sum(int(row["mono_positives"]) for row in rows) > CLIPS["eval"]  # clips hold 1-2 events
    for name in ("mono", "poly2", "poly3"):
        aps = [float(row[f"{name}_ap"]) for row in rows if row[f"{name}_ap"]]
        mean = results["mAP"] if name == "mono" else results[f"{name}_mAP"]
        assert np.mean(aps) == pytest.approx(mean, abs=1e-5)
    assert sum(int(row["poly3_positives"]) for row in rows) >= 3 * MIXTURES


def test_bad_polyphonic_config_exits_2(setup):
    argv = ["--model", f"models:/{MODEL}/{setup.version.version}", "--train-shards", "shards",
            "--test-shards", "shards", "--set", "eval.polyphonic.enabled=true"]
    assert evaluate_job.main([*argv, "--set", "eval.polyphonic.sources=[1]"]) == 2
    assert evaluate_job.main([*argv, "--set", "eval.polyphonic.sources=[2,2]"]) == 2
    assert evaluate_job.main([*argv, "--set", "eval.polyphonic.loudness=lufs"]) == 2
    assert evaluate_job.main([*argv, "--set", "eval.polyphonic.mixtures=0"]) == 2


def test_a_source_that_does_not_decode_drops_its_mixtures_and_they_are_counted(setup):
    polyphonic = dataclasses.replace(setup.config.eval.polyphonic, sources=[2])
    config = dataclasses.replace(setup.config, eval=dataclasses.replace(setup.config.eval, polyphonic=polyphonic))
    paths, labels = manifest_test_clips(config, setup.info["classes"])
    mixtures = draw_mixtures(labels, MIXTURES, 2, config.eval.polyphonic.seed)
    victim = Path(paths[mixtures[0][0]])
    containing = sum(mixtures[0][0] in mixture for mixture in mixtures)
    original = victim.read_bytes()
    try:
        victim.write_bytes(b"RIFF" + bytes(200))  # a damaged WAV header
        results = evaluate_job.evaluate(f"models:/{MODEL}/{setup.version.version}", "shards", "shards", config)
    finally:
        victim.write_bytes(original)
    assert results["poly2_dropped"] == containing >= 1
    assert results["poly2_mixtures"] + results["poly2_dropped"] == MIXTURES


def test_the_evaluation_run_names_its_source_and_user(setup):
    results = evaluate_job.evaluate(f"models:/{MODEL}/{setup.version.version}", "shards", "shards",
                                    load_config("probe", ["data.loader.num_workers=0"]))
    tags = mlflow_client().get_run(results["run_id"]).data.tags
    assert tags["mlflow.source.name"] == "jobs.evaluate" and tags["mlflow.user"]


def test_polyphonic_mode_without_the_sources_of_the_test_split_exits_2(setup, caplog):
    argv = ["--model", f"models:/{MODEL}/{setup.version.version}", "--train-shards", "shards", "--test-shards",
            "shards", "--set", "data.loader.num_workers=0", "--set", "eval.polyphonic.enabled=true",
            "--set", "data.source.splits=[]", "--set", "data.source.audio_root="]
    assert evaluate_job.main(argv) == 2
    assert "eval.polyphonic needs the data.source" in caplog.text


class _WithHead:
    """A registered encoder's python model with a classifier head over the dataset's classes (what a fine-tuned
    classifier version loads as): logits from a fixed projection of the CLS output."""

    def __init__(self, python_model, classes: list[dict]) -> None:
        self.inner, self.classes, self.model_cfg = python_model, classes, python_model.model_cfg
        self.head = torch.nn.Linear(python_model.model_cfg.embed_dim, len(classes))
        torch.nn.init.normal_(self.head.weight, generator=torch.Generator().manual_seed(3))
        self.embedded_clips = 0

    def embed(self, fbank, pooling=None, valid_frames=None):
        outputs = self.inner.embed(fbank, pooling, valid_frames=valid_frames)
        self.embedded_clips += fbank.shape[0]
        with torch.no_grad():
            return {**outputs, "logits": self.head(outputs["utterance"])}


def test_a_model_with_a_head_is_scored_by_its_head_on_the_mixtures_too(setup, monkeypatch):
    _, _, python_model = evaluate_job._load(f"models:/{MODEL}/{setup.version.version}", mlflow_client())
    model = _WithHead(python_model, setup.info["classes"])
    monkeypatch.setattr(evaluate_job, "_load", lambda uri, client: (None, uri, model))

    def no_probe(*args, **kwargs):
        raise AssertionError("a model whose head covers the classes is not probed")

    monkeypatch.setattr(evaluate_job, "train_probe", no_probe)
    results = evaluate_job.evaluate("models:/with-head/1", "shards", "shards", setup.config)
    assert results["protocol"] == "head"
    assert results["poly2_mixtures"] == results["poly3_mixtures"] == MIXTURES
    assert 0.0 < results["poly2_mAP"] <= 1.0 and 0.0 < results["poly3_mAP"] <= 1.0
    assert model.embedded_clips == sum(CLIPS.values()) + 2 * MIXTURES  # mono splits, then both mixture sets
