"""jobs.evaluate on sample data: evaluation shards of generated sound events (pipeline.synth through the
pipeline.audio front-end), a briefly pre-trained and a random tiny encoder registered in the project-level store,
the linear probe against the label-prior baseline, logging, version tags and `--promote`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jobs import evaluate as evaluate_job
from jobs.mlops import registry
from jobs.train.checkpointing import STUDENT_FILE
from jobs.train.config import dump_yaml, load_config
from jobs.train.ema import MasterWeightEMA
from jobs.train.metrics import mean_average_precision
from jobs.mlops.client import mlflow_client
from jobs.mlops.tracking import HTTP_DEFAULTS
from model.sslam import SSLAM
from pipeline import shards, storage
from pipeline.audio import fbank_batch
from pipeline.plan import sample_key, shard_name
from pipeline.synth import synth_classes

MODEL = "sslam-encoder"
CLEARED = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
           "MLFLOW_RUN_ID", *HTTP_DEFAULTS)
NUM_CLASSES = 12
CLIPS = {"train": 120, "eval": 60}
CLIP_SECONDS = 2.0
CLIPS_PER_SHARD = 32
PRETRAIN_STEPS = 40
# Asserted margin of the pre-trained encoder's probe over the label prior (measured: see the report).
MIN_MARGIN = 0.1
SHARDS = ["--train-shards", "shards", "--test-shards", "shards", "--set", "data.loader.num_workers=0"]


def synth_clips(count: int, sample_rate: int, rng: np.random.Generator) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Clips of 1-2 sound events of distinct classes over faint noise, and their labels."""
    classes = synth_classes(NUM_CLASSES)
    samples = int(CLIP_SECONDS * sample_rate)
    waves, labels = [], []
    for _ in range(count):
        chosen = sorted(int(k) for k in rng.choice(NUM_CLASSES, size=int(rng.integers(1, 3)), replace=False))
        mix = 1e-3 * rng.standard_normal(samples)
        for k in chosen:
            length = int(rng.uniform(0.6, 1.6) * sample_rate)
            onset = int(rng.integers(0, samples - length))
            t = np.arange(length) / sample_rate
            event = classes[k].kind.generate(rng, t, sample_rate, classes[k].pitch)
            mix[onset : onset + length] += rng.uniform(0.2, 0.5) * event / max(np.abs(event).max(), 1e-9)
        waves.append(torch.from_numpy(mix.astype(np.float32)))
        labels.append(chosen)
    return waves, labels


def write_evaluation_set(directory: Path, audio_cfg, seed: int = 0,
                         audio_dir: Path | None = None) -> tuple[dict, torch.Tensor]:
    """Shards of splits `train` and `eval` (one clip per sample) + index.parquet + dataset.json; also returns
    the train split's features (for pre-training). With `audio_dir`, each split's clips are also written there
    as wav files listed by `audio_dir/<split>.csv` (a folder source's `path,labels` with MIDs)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_epoch, index_rows, train_features = {}, [], None
    mids = [c.mid for c in synth_classes(NUM_CLASSES)]
    for split, count in CLIPS.items():
        waves, labels = synth_clips(count, audio_cfg.sample_rate, rng)
        features = fbank_batch(waves, audio_cfg)
        if audio_dir is not None:
            write_audio_split(audio_dir, split, waves, [[mids[k] for k in row] for row in labels],
                              audio_cfg.sample_rate)
        if split == "train":
            train_features = features
        names = []
        for shard, start in enumerate(range(0, count, CLIPS_PER_SHARD)):
            samples = []
            for i in range(start, min(start + CLIPS_PER_SHARD, count)):
                key = sample_key(split, 0, shard, i - start)
                samples.append((key, shards.encode_eval_sample(features[i].numpy().astype(np.float16), key, labels[i])))
            name = shard_name(split, 0, shard)
            shards.write_shard(samples, storage.locate(directory), name)
            index_rows += shards.index_rows(name, samples)
            names.append(name)
        per_epoch[split] = {"mix": False, "shards_per_epoch": {"0": names}, "samples": count}
    storage.locate(directory).write_table("index.parquet", shards.index_table(index_rows))
    info = {
        "splits": per_epoch,
        "target_length": audio_cfg.target_length,
        "mel_bins": audio_cfg.mel_bins,
        "patch_size": 16,
        "classes": [{"index": c.index, "mid": c.mid, "name": c.display_name} for c in synth_classes(NUM_CLASSES)],
        "fingerprint": f"synth-eval-{seed}",
    }
    (directory / "dataset.json").write_text(json.dumps(info))
    return info, train_features


def write_audio_split(audio_dir: Path, split: str, waves: list[torch.Tensor], labels: list[list[str]],
                      sample_rate: int) -> None:
    import soundfile

    (audio_dir / split).mkdir(parents=True, exist_ok=True)
    lines = ["path,labels"]
    for i, (wave, mids) in enumerate(zip(waves, labels)):
        soundfile.write(audio_dir / split / f"{i:04d}.wav", wave.numpy(), sample_rate, subtype="FLOAT")
        lines.append(f'{split}/{i:04d}.wav,"{";".join(mids)}"')
    (audio_dir / f"{split}.csv").write_text("\n".join(lines) + "\n")


def pretrain(config, features: torch.Tensor, steps: int, seed: int = 0) -> SSLAM:
    """A short stage-1 pre-training of the tiny model on the unlabelled train clips (plain PyTorch)."""
    torch.manual_seed(seed)
    model = SSLAM(config.model)
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=config.train.peak_lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    batch = config.data.loader.micro_batch_clips
    ema = MasterWeightEMA(model.encoder, model.teacher)
    for step in range(steps):
        rows = torch.randint(0, features.shape[0], (batch,), generator=generator)
        loss, _, _ = model({"clean": features[rows].unsqueeze(1)}, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model.ema_decay(step + 1))
    return model


def register(model: SSLAM, config, run_dir: Path, updates: int):
    """Register `model`'s student encoder through a checkpoint folder (its student.safetensors)."""
    tag_dir = run_dir / "checkpoints" / f"update_{updates:08d}"
    tag_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tag_dir / STUDENT_FILE))
    (tag_dir / "config.yaml").write_text(dump_yaml(config))
    return registry.register_checkpoint(tag_dir)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as patch:
        for name in CLEARED:
            patch.delenv(name, raising=False)
        patch.chdir(root)
        config = load_config("probe", ["eval.train_shards=shards", "eval.test_shards=shards",
                                       "data.loader.num_workers=0", "data.loader.shards=shards",
                                       "tracking.aliases=[candidate]"])
        info, train_features = write_evaluation_set(root / "shards", config.data.audio)
        random_version = register(SSLAM(config.model), config, root / "runs" / "random", 0)
        trained = pretrain(config, train_features, PRETRAIN_STEPS)
        trained_version = register(trained, config, root / "runs" / "trained", PRETRAIN_STEPS)
        yield SimpleNamespace(root=root, config=config, info=info, random=random_version, trained=trained_version)


def test_metrics_helpers():
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.7, 0.6, 0.5], [0.1, 0.3, 0.5]])
    value, scored = mean_average_precision(labels, scores)
    assert (value, scored) == (1.0, 2)  # class 2 has no positive: skipped
    prior = evaluate_job.label_prior(torch.tensor(labels, dtype=torch.float32), 4)
    value, _ = mean_average_precision(labels, prior)
    assert value == pytest.approx(0.5)  # a constant score's AP is the class's prevalence
    assert evaluate_job.accuracy(np.eye(3), np.eye(3)[[0, 2, 1]]) == pytest.approx(1 / 3)


def test_probe_beats_the_label_prior_and_is_logged_and_tagged(setup):
    client = mlflow_client()
    uri = f"models:/{MODEL}/{setup.trained.version}"
    results = evaluate_job.evaluate(uri, "shards", "shards", setup.config)
    assert results["metric"] == "mAP" and results["protocol"] == "probe"
    assert (results["num_train"], results["num_test"], results["classes_scored"]) == (120, 60, NUM_CLASSES)
    assert results["mAP"] > results["baseline_mAP"] + MIN_MARGIN
    assert 0.05 < results["baseline_mAP"] < 0.3
    run = client.get_run(results["run_id"])
    assert run.data.metrics["mAP"] == pytest.approx(results["mAP"])
    assert run.data.metrics["baseline_mAP"] == pytest.approx(results["baseline_mAP"])
    assert run.data.tags["model_version"] == str(setup.trained.version) and run.data.params["eval.pooling"] == "cls"
    tags = client.get_model_version(MODEL, setup.trained.version).tags
    assert float(tags["eval.mAP"]) == pytest.approx(results["mAP"], abs=1e-6)
    assert float(tags["eval.baseline_mAP"]) == pytest.approx(results["baseline_mAP"], abs=1e-6)
    assert tags["eval.run_id"] == results["run_id"]
    # Same protocol, same numbers.
    again = evaluate_job.evaluate(uri, "shards", "shards", setup.config)
    assert again["mAP"] == pytest.approx(results["mAP"], abs=1e-6)


def test_promote_moves_best_only_when_better(setup, capsys):
    client = mlflow_client()
    results = {}
    for name, version in (("random", setup.random), ("trained", setup.trained)):
        argv = ["--model", f"models:/{MODEL}/{version.version}", "--promote", *SHARDS]
        assert evaluate_job.main(argv) == 0
        results[name] = json.loads(capsys.readouterr().out)
    best, worse = sorted(results, key=lambda name: results[name]["mAP"], reverse=True)
    assert all((r["train"], r["test"], r["overlap"]["disjoint"]) == ("shards:train", "shards:eval", True)
               for r in results.values())
    assert results["random"]["promoted"]  # nothing held `best`
    assert results["trained"]["promoted"] == (best == "trained")
    holder = client.get_model_version_by_alias(MODEL, "best")
    assert str(holder.version) == str(getattr(setup, best).version)
    # Evaluating the worse one again does not take `best` from the better one.
    argv = ["--model", f"models:/{MODEL}/{getattr(setup, worse).version}", "--promote", *SHARDS]
    assert evaluate_job.main(argv) == 0
    assert not json.loads(capsys.readouterr().out)["promoted"]
    assert str(client.get_model_version_by_alias(MODEL, "best").version) == str(getattr(setup, best).version)


def test_promotion_is_refused_when_the_probe_is_tested_on_its_training_data(setup, capsys):
    client = mlflow_client()
    try:
        before = str(client.get_model_version_by_alias(MODEL, "best").version)
    except Exception:  # noqa: BLE001 - nothing holds it yet when this test runs alone
        before = None
    shutil.copytree(setup.root / "shards", setup.root / "copy")  # other files, the same samples
    for test_shards, what in (("shards", "same_set"), ("copy", "shared_clip_keys")):
        argv = ["--model", f"models:/{MODEL}/{setup.trained.version}", "--promote", "--train-shards", "shards",
                "--test-shards", test_shards, "--set", "data.loader.num_workers=0", "--set", "eval.test_split=train"]
        assert evaluate_job.main(argv) == 1
        captured = capsys.readouterr()
        report = json.loads(captured.out)
        assert (report["train"], report["test"]) == ("shards:train", f"{test_shards}:train")
        assert report["overlap"][what] and not report["overlap"]["disjoint"]
        assert not report["promoted"] and "not disjoint" in report["promotion_refused"]
        assert "not promoted" in captured.err
    assert report["overlap"]["shared_shards"] == 0 and report["overlap"]["shared_sample_keys"] == CLIPS["train"]
    try:
        after = str(client.get_model_version_by_alias(MODEL, "best").version)
    except Exception:  # noqa: BLE001
        after = None
    assert after == before
    tags = client.get_model_version(MODEL, setup.trained.version).tags
    assert (tags["eval.test"], tags["eval.splits_disjoint"]) == ("copy:train", "false")


def test_alias_uri_resolves_to_the_version(setup):
    results = evaluate_job.evaluate(f"models:/{MODEL}@candidate", "shards", "shards", setup.config)
    assert results["model_version"] == str(setup.trained.version)  # registered last: candidate


def test_a_model_with_a_covering_head_is_scored_without_a_probe(setup, tmp_path):
    from test_registry import finetuned_checkpoint

    classes = setup.info["classes"]
    path = tmp_path / "EAT_finetuned.pt"
    torch.save(finetuned_checkpoint(setup.config, len(classes) + 1), path)  # one class more than the dataset
    labels = tmp_path / "class_labels_indices.csv"
    rows = [(c["mid"], c["name"]) for c in reversed(classes)] + [("/m/other", "Other")]  # another order
    labels.write_text("index,mid,display_name\n" + "".join(f'{i},{m},"{n}"\n' for i, (m, n) in enumerate(rows)))
    version = registry.register_official(path, "eat-head", class_labels_csv=labels)
    uri = f"models:/eat-head/{version.version}"
    results = evaluate_job.evaluate(uri, "shards", "shards", setup.config)
    assert results["protocol"] == "head" and results["classes_scored"] == NUM_CLASSES
    assert 0.0 < results["mAP"] < 1.0
    assert mlflow_client().get_model_version("eat-head", version.version).tags["eval.protocol"] == "head"
    setup.config.eval.use_head = False
    try:
        assert evaluate_job.evaluate(uri, "shards", "shards", setup.config)["protocol"] == "probe"
    finally:
        setup.config.eval.use_head = True
