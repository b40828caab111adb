"""Registrations cannot be planted and registered models cannot be swapped (jobs.mlops.registry, jobs.mlops.pyfunc_model,
jobs.infer, jobs.evaluate): a crafted pickle in a checkpoint folder never runs without --trusted; pending folders
that do not match their signed export record are refused; a version whose artifact was altered after
registration is refused by `sslam infer`, `sslam evaluate` and mlflow.pyfunc.load_model itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile
import torch
from safetensors.torch import load_file

from jobs import evaluate as evaluate_job
from jobs import infer as infer_job
from jobs import register as register_job
from jobs.mlops import pyfunc_package, registration, registry
from jobs.train.checkpointing import sha256_file
from jobs.train.checkpointing import STUDENT_FILE
from jobs.train.config import load_config
from jobs.mlops.client import mlflow_client
from model.checkpoint import ImportedCheckpoint, load_weights, save_weights
from model.encoder import Encoder
from registry_support import Payload, seeded_checkpoint, use_store

MODEL = "sslam-integrity"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A project-level store in a temporary working directory and a signing key of its own."""
    root = tmp_path_factory.mktemp("integrity")
    with pytest.MonkeyPatch.context() as patch:
        use_store(patch, root)
        config = load_config("tiny_stage1", [f"tracking.model_name={MODEL}"])
        yield SimpleNamespace(root=root, config=config)


def checkpoint_folder(run_dir: Path, config, updates: int, student: bool = True, payload: Path | None = None) -> Path:
    """A checkpoint folder: config.yaml, student.safetensors (optional) and DeepSpeed's pickled states (with a
    payload that touches `payload` when unpickled)."""
    tag_dir, model = seeded_checkpoint(run_dir, config, updates, student=student)
    states = {"module": model.state_dict()}
    if payload is not None:
        states["hook"] = Payload(payload)
        torch.save({"optimizer_state_dict": Payload(payload)}, tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save(states, tag_dir / "mp_rank_00_model_states.pt")
    return tag_dir


def test_crafted_pickle_in_a_checkpoint_never_runs_without_trusted(store, capsys):
    marker = store.root / "pickle-ran"
    bare = checkpoint_folder(store.root / "runs" / "bare", store.config, 4, student=False, payload=marker)
    assert register_job.main(["--checkpoint", str(bare)]) == 1
    assert "--trusted" in capsys.readouterr().err
    assert not marker.exists()

    with_student = checkpoint_folder(store.root / "runs" / "student", store.config, 8, payload=marker)
    assert register_job.main(["--checkpoint", str(with_student)]) == 0
    assert not marker.exists()  # exported from student.safetensors; the pickles were never opened
    version = registry.resolve_version(f"models:/{MODEL}/latest", mlflow_client())
    registered = artifact_dir(version) / pyfunc_package.WEIGHTS_ARTIFACT
    assert version.tags[registry.WEIGHTS_SHA_TAG] == sha256_file(registered)
    assert len(version.tags[registry.MODEL_SHA_TAG]) == 64
    student = load_file(str(with_student / STUDENT_FILE))
    encoder = load_weights(registered).student_encoder
    assert set(encoder) == {k[len("encoder."):] for k in student if k.startswith("encoder.")}
    assert all(torch.equal(encoder[k], student[f"encoder.{k}"]) for k in encoder)

    # Control: --trusted is what lets DeepSpeed's pickles be read (here the ZeRO-0 layout's model states).
    (bare / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert register_job.main(["--checkpoint", str(bare), "--trusted"]) == 0
    assert marker.exists()


def test_planted_pending_folders_are_refused(store, capsys, monkeypatch):
    client = mlflow_client()
    run_dir = store.root / "runs" / "planted"
    tag_dir = checkpoint_folder(run_dir, store.config, 12)
    model_name = "sslam-planted"
    genuine = registration.export_checkpoint(tag_dir, 12, run_dir, model_name=model_name, aliases=["candidate"])
    root = registration.registrations_dir(run_dir)

    copied = root / "update_00000099"  # a genuine record under another folder name
    shutil.copytree(genuine, copied)
    code_marker = store.root / "planted-code-ran"
    altered = root / "update_00000100"  # genuine record, pyfunc code changed
    registration.export_checkpoint(checkpoint_folder(run_dir, store.config, 100), 100, run_dir, model_name=model_name)
    assert (altered / registration.MODEL_DIR / "pyfunc_model.py").is_file()  # the pyfunc's code, run at load
    with open(altered / registration.MODEL_DIR / "pyfunc_model.py", "a") as handle:
        handle.write(f"\nimport os\nos.system('touch {code_marker}')\n")
    unsigned = root / "update_00000101"  # a hand-made record
    shutil.copytree(genuine, unsigned)
    record = json.loads((unsigned / registration.PENDING_FILE).read_text())
    record["signature"] = ""
    (unsigned / registration.PENDING_FILE).write_text(json.dumps(record))
    monkeypatch.setenv(registration.KEY_ENV, str(store.root / "other-user.key"))
    foreign = registration.export_checkpoint(checkpoint_folder(run_dir, store.config, 102), 102, run_dir,
                                         model_name=model_name)  # signed with another user's key
    monkeypatch.setenv(registration.KEY_ENV, str(store.root / "keys" / "registration.key"))

    assert register_job.main([str(run_dir)]) == 1  # `sslam register RUN_DIR`
    captured = capsys.readouterr()
    assert "registered sslam-planted version 1 (update 12)" in captured.out
    assert "4 registrations are still pending" in captured.err
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert [v.tags["update"] for v in versions] == ["12"]
    assert sorted(p.name for p in registration.pending_folders(run_dir)) == sorted(
        p.name for p in (copied, altered, unsigned, foreign))
    for folder in (copied, altered, unsigned, foreign):
        assert json.loads((folder / registration.PENDING_FILE).read_text())["last_error"].startswith("RegistrationRefused")
    assert not code_marker.exists()
    assert str(client.get_model_version_by_alias(model_name, "candidate").version) == "1"

    # A folder planted under the name of a checkpoint still to come does not block that checkpoint's export.
    later = registration.export_checkpoint(checkpoint_folder(run_dir, store.config, 101), 101, run_dir,
                                       model_name=model_name)
    assert later == unsigned
    [version] = registry.register_pending(run_dir)  # the three others stay refused
    assert version.tags["update"] == "101" and len(registration.pending_folders(run_dir)) == 3


def artifact_dir(version) -> Path:
    client = mlflow_client()
    model_id = client.get_model_version(version.name, version.version).source[len("models:/"):]
    logged = client.get_logged_model(model_id)
    return Path(urlparse(logged.artifact_location).path)


def test_tampered_registered_model_is_refused_by_infer_evaluate_and_pyfunc(store, tmp_path, capsys):
    tag_dir = checkpoint_folder(store.root / "runs" / "tamper", store.config, 16)
    version = registry.register_checkpoint(tag_dir, model_name="sslam-tamper")
    uri = f"models:/sslam-tamper/{version.version}"
    wav = tmp_path / "tone.wav"
    soundfile.write(wav, (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32), 16000)
    assert infer_job.main([str(wav), "--model", uri]) == 0  # control: the genuine artifact loads
    capsys.readouterr()

    artifacts = artifact_dir(version)
    genuine = (artifacts / pyfunc_package.WEIGHTS_ARTIFACT).read_bytes()
    torch.manual_seed(1234)
    other = ImportedCheckpoint(config=store.config.model, kind="encoder",
                               student_encoder=dict(Encoder(store.config.model).state_dict()))
    save_weights(other, artifacts / pyfunc_package.WEIGHTS_ARTIFACT)  # valid weights, not the registered ones

    assert infer_job.main([str(wav), "--model", uri]) == 1
    assert "was altered" in capsys.readouterr().err
    assert evaluate_job.main(["--model", uri, "--train-shards", "unused", "--test-shards", "unused"]) == 1
    assert "was altered" in capsys.readouterr().err
    with pytest.raises(Exception, match="was altered or corrupted"):
        mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"}).predict(
            pd.DataFrame({"fbank": [(-4.0 + torch.randn(512, 64)).tolist()]}))

    # The weights back, the code changed: refused before the code runs.
    (artifacts / pyfunc_package.WEIGHTS_ARTIFACT).write_bytes(genuine)
    marker = store.root / "artifact-code-ran"
    assert (artifacts / "pyfunc_model.py").is_file()
    with open(artifacts / "pyfunc_model.py", "a") as handle:
        handle.write(f"\nimport os\nos.system('touch {marker}')\n")
    assert infer_job.main([str(wav), "--model", uri]) == 1
    assert "files (code, MLmodel, config) differ" in capsys.readouterr().err
    assert not marker.exists()
