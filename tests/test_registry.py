"""jobs.mlops.registry + jobs.mlops.pyfunc_model + jobs.infer with the project-level store: a real one-process DeepSpeed ZeRO-2
pre-training (jobs.pretrain) tracked and registered at every checkpoint, the registered pyfunc against the
in-process encoder, alias rules, and an official fine-tuned checkpoint with a classifier head."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile
import torch
import torch.distributed as dist

from jobs import infer as infer_job
from jobs import register as register_job
from jobs.mlops import registration, registry
from jobs.train.checkpointing import consolidated_student
from jobs.train.config import load_config
from jobs.mlops.lineage import MODEL_VERSIONS, link_version
from jobs.mlops.client import mlflow_client
from jobs.mlops.tracking import HTTP_DEFAULTS
from model.build import build_classifier
from model.official import import_official, official_name
from model.encoder import Encoder
from model.features import extract_features
from pipeline.audio import fbank_batch, to_model_rate
from shardsets import write_training_set

MODEL = "sslam-encoder"
CPU = {"device": "cpu"}  # compared with CPU results below, also on a GPU machine
CLEARED = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
           "MLFLOW_RUN_ID", *HTTP_DEFAULTS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """8 updates of tiny stage 1 under DeepSpeed ZeRO-2 (one CPU rank, gloo), checkpoints at 4 and 8 (keep 1),
    tracked by a Tracker that registers every checkpoint into ./mlruns of a temporary working directory."""
    from jobs.pretrain import Pretrainer

    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        for name in CLEARED:
            patch.delenv(name, raising=False)
        patch.chdir(root)
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                            "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
            patch.setenv(name, value)
        if not torch.cuda.is_available():
            patch.setenv("DS_ACCELERATOR", "cpu")
        info = write_training_set(root / "shards", 512, 64, num_shards=2, groups_per_shard=6)
        config = load_config("tiny_stage1", [
            "data.loader.shards=shards", "data.loader.num_workers=0", "train.output_dir=runs/stage1",
            "train.max_updates=8", "train.checkpoint_interval=4", "train.keep_checkpoints=1", "train.log_interval=2",
            "tracking.register=every_checkpoint", "tracking.aliases=[candidate]",
        ])
        trainer = Pretrainer(config)  # rank 0: starts its own Tracker and logs the first batch's preview
        try:
            trainer.run()
        finally:
            trainer.trace.close()
            time.sleep(1.2)  # at least one system-metrics sample
            trainer.tracker.finish()
            dist.destroy_process_group()
        tracker = trainer.tracker
        yield SimpleNamespace(root=root, config=config, tracker=tracker, info=info,
                              checkpoints=root / "runs" / "stage1" / "checkpoints")


def test_training_run_is_tracked(trained):
    client = mlflow_client()
    run = client.get_run(trained.tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny-stage1"
    assert run.data.params["train.zero_stage"] == "2"
    assert run.data.tags["dataset_fingerprint"] == trained.info["fingerprint"]
    assert run.data.tags["world_size"] == "1"
    assert run.data.tags["mlflow.source.name"] == "jobs.pretrain" and run.data.tags["mlflow.user"]
    [shard_set] = run.inputs.dataset_inputs
    assert shard_set.dataset.digest == trained.info["fingerprint"][:36]
    assert json.loads(shard_set.dataset.source) == {"uri": (trained.root / "shards").as_uri()}
    assert json.loads(shard_set.dataset.profile)["samples"] == sum(
        split["samples"] for split in trained.info["splits"].values())
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6, 8]
    assert {"lr", "grad_norm", "clips_per_s"} <= set(run.data.metrics)
    assert any(key.startswith("system/") for key in run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "preview")] == ["preview/preview.png"]
    ds_config = Path(client.download_artifacts(run.info.run_id, "config/deepspeed_config.json", str(trained.root)))
    assert json.loads(ds_config.read_text())["zero_optimization"]["stage"] == 2


def test_every_checkpoint_is_registered_with_tags_and_candidate(trained):
    client = mlflow_client()
    versions = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert [(str(v.version), v.tags["update"]) for v in versions] == [("1", "4"), ("2", "8")]
    for version in versions:
        assert version.run_id == trained.tracker.run_id
        assert version.tags["run_id"] == trained.tracker.run_id
        assert (version.tags["stage"], version.tags["encoder"], version.tags["source"]) == ("1", "vit-32-2", "pretrain")
        assert version.tags["dataset_fingerprint"] == trained.info["fingerprint"]
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == "2"
    for version in versions:  # each logged model lists its version as mlflow.register_model would
        model_id = version.source.removeprefix("models:/")
        logged = client.get_logged_model(model_id)
        assert [(e["name"], str(e["version"])) for e in json.loads(logged.tags[MODEL_VERSIONS])] == [
            (MODEL, str(version.version))]
        link_version(client, model_id, MODEL, version.version)  # a retry lists it once
        assert client.get_logged_model(model_id).tags[MODEL_VERSIONS] == logged.tags[MODEL_VERSIONS]
        assert logged.source_run_id == trained.tracker.run_id
        for tags in (logged.tags, version.tags):
            assert tags["mlflow.user"] and tags["mlflow.source.name"] and tags["mlflow.source.git.commit"]
    run_dir = trained.root / "runs" / "stage1"
    assert registration.pending_folders(run_dir) == []
    done = sorted(p.parent.name for p in registration.registrations_dir(run_dir).glob(f"*/{registration.DONE_FILE}"))
    assert done == ["update_00000004", "update_00000008"]
    # keep_checkpoints=1 pruned update 4, but its version was exported before and still loads.
    assert not (trained.checkpoints / "update_00000004").exists()
    assert mlflow.pyfunc.load_model(f"models:/{MODEL}/1").metadata.signature is not None


def test_registered_model_matches_the_trained_encoder(trained):
    student = consolidated_student(trained.checkpoints, "update_00000008")
    encoder = Encoder(trained.config.model)
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in student.items() if k.startswith("encoder.")})
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate", model_config=CPU)
    audio = trained.config.data.audio

    rng = np.random.default_rng(0)
    waves = [(rng.normal(0, 0.1, 32000).astype(np.float32), 16000),
             (rng.normal(0, 0.1, 57330).astype(np.float32), 44100)]
    predicted = model.predict(pd.DataFrame({"waveform": [w.tolist() for w, _ in waves],
                                            "sample_rate": [sr for _, sr in waves]}))
    expected = extract_features(encoder, fbank_batch([to_model_rate(w, sr, audio) for w, sr in waves], audio))
    assert predicted["utterance"].shape == (2, 32) and predicted["frames"].shape == (2, 128, 32)
    np.testing.assert_allclose(predicted["utterance"], expected["utterance"].numpy(), atol=1e-5)
    np.testing.assert_allclose(predicted["frames"], expected["frames"].numpy(), atol=1e-5)

    short = -4.0 + 3.0 * torch.randn(300, 64)  # zero rows appended, as the front-end pads
    long = -4.0 + 3.0 * torch.randn(600, 64)  # head kept
    predicted = model.predict(pd.DataFrame({"fbank": [short.tolist(), long.tolist()]}), params={"pooling": "mean"})
    fitted = torch.zeros(2, 512, 64)
    fitted[0, :300], fitted[1] = short, long[:512]
    expected = extract_features(encoder, fitted, pooling="mean")
    np.testing.assert_allclose(predicted["utterance"], expected["utterance"].numpy(), atol=1e-5)
    np.testing.assert_allclose(predicted["frames"], expected["frames"].numpy(), atol=1e-5)

    with pytest.raises(Exception, match="shorter than one frame"):
        model.predict(pd.DataFrame({"waveform": [[0.0] * 100], "sample_rate": [16000]}))
    with pytest.raises(Exception, match="exactly one of"):
        model.predict(pd.DataFrame({"waveform": [waves[0][0].tolist()], "sample_rate": [16000],
                                    "fbank": [short.tolist()]}))


def test_candidate_alias_rules_and_reserved_latest(trained):
    client = mlflow_client()
    tag_dir = trained.checkpoints / "update_00000008"
    # An older update of the same run registered late does not take `candidate` from a newer one.
    older = registry.register_checkpoint(tag_dir, updates=3, run_dir=trained.root / "late",
                                         run_id=trained.tracker.run_id)
    assert older.tags["update"] == "3"
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == "2"
    # Re-registering an exported checkpoint returns its version instead of a new one.
    assert registry.register_checkpoint(tag_dir, updates=3, run_dir=trained.root / "late").version == older.version
    # Another run's checkpoint moves it.
    other = registry.register_checkpoint(tag_dir, run_dir=trained.root / "other")
    assert client.get_model_version_by_alias(MODEL, "candidate").version == other.version
    assert registry.register_pending(trained.root / "other") == []
    assert register_job.main([str(trained.root / "runs" / "stage1")]) == 0  # `sslam register RUN_DIR`: nothing pending
    with pytest.raises(ValueError, match="reserves"):
        registration.export_checkpoint(tag_dir, 8, trained.root / "bad", aliases=["latest"])
    with pytest.raises(ValueError, match="evaluate --promote"):
        registration.export_checkpoint(tag_dir, 8, trained.root / "bad", aliases=["best"])


def test_one_process_at_a_time_completes_a_registration(trained):
    """A live run's tracker and `sslam register` retrying the same pending folder must not create two versions."""
    import fcntl

    tag_dir = trained.checkpoints / "update_00000008"
    run_dir = trained.root / "claimed"
    folder = registration.export_checkpoint(tag_dir, 8, run_dir, model_name="sslam-claim-test", aliases=[])
    with open(folder / registry.CLAIM_FILE, "a") as other_process:  # its own open file description: a rival lock
        fcntl.flock(other_process, fcntl.LOCK_EX)
        with pytest.raises(registry.RegistrationBusy):
            registry.complete_registration(folder)
        assert registry.register_pending(run_dir) == []
        assert registration.pending_folders(run_dir) == [folder]
    [version] = registry.register_pending(run_dir)
    assert registration.pending_folders(run_dir) == []
    # A process that was waiting for the folder finds it done and gets the same version, not a new one.
    assert registry.complete_registration(folder).version == version.version
    assert len(mlflow_client().search_model_versions("name = 'sslam-claim-test'")) == 1


def finetuned_checkpoint(config, num_classes: int, seed: int = 0) -> dict:
    """An official fine-tuned EAT file's layout (fairseq keys under `model.`, fp16, a head) from a random encoder."""
    torch.manual_seed(seed)
    encoder = Encoder(config.model)
    state = {f"model.{official_name(key)}": value.half() for key, value in encoder.state_dict().items()}
    dim = config.model.embed_dim
    state.update({
        "fc_norm.weight": (1 + 0.1 * torch.randn(dim)).half(), "fc_norm.bias": (0.1 * torch.randn(dim)).half(),
        "head.weight": torch.randn(num_classes, dim).half(), "head.bias": torch.randn(num_classes).half(),
    })
    cfg = {"model": {"_name": "mae_image_classification", "num_classes": num_classes, "pretrained_model_args": {
        "model": {"num_heads": config.model.num_heads}, "task": {"target_length": config.model.target_length}}}}
    return {"cfg": cfg, "model": state, "optimizer_history": [{"num_updates": 1234}]}


def test_official_checkpoint_with_head_predicts_labels_and_infers(trained, tmp_path, capsys):
    names = ["Speech", "Dog", "Music", "Siren", "Rain"]
    path = tmp_path / "EAT_finetuned.pt"
    torch.save(finetuned_checkpoint(trained.config, len(names)), path)
    labels = tmp_path / "class_labels_indices.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f'{i},/m/x{i},"{n}"\n' for i, n in enumerate(names)))
    version = registry.register_official(path, "eat-official", class_labels_csv=labels, aliases=["candidate"])
    assert (version.tags["source"], version.tags["update"], version.tags["kind"]) == ("official", "1234", "finetune")

    model = mlflow.pyfunc.load_model("models:/eat-official@candidate", model_config=CPU)
    fbank = -4.0 + 3.0 * torch.randn(3, 512, 64)
    predicted = model.predict(pd.DataFrame({"fbank": [f.tolist() for f in fbank]}), params={"top_k": 2})
    expected = build_classifier(import_official(path))(fbank.unsqueeze(1)).detach()
    np.testing.assert_allclose(predicted["logits"], expected.numpy(), atol=1e-5)
    top = expected.sigmoid().topk(2, dim=1).indices
    assert predicted["top_labels"].tolist() == [[names[i] for i in row] for row in top.tolist()]

    wav = tmp_path / "tone.wav"
    t = np.arange(int(1.5 * 22050)) / 22050
    soundfile.write(wav, (0.3 * np.sin(2 * np.pi * 660 * t)).astype(np.float32), 22050)
    assert infer_job.main([str(wav), "--model", "models:/eat-official@candidate", "--top-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "1.5 s at 22050 Hz" in printed and sum(f" {n} (" in printed for n in names) == 3
    summary = infer_job.infer(wav, f"models:/{MODEL}/2")
    assert summary["utterance_shape"] == [1, 32] and summary["frames_shape"] == [1, 128, 32]
    assert "top" not in summary
    assert infer_job.main([str(tmp_path / "missing.wav"), "--model", f"models:/{MODEL}/2"]) == 1
