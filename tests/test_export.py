"""`sslam export` (jobs/export.py) and the Python API (model/pretrained.py): every source kind (run folder's newest
complete checkpoint, checkpoint folder, official fine-tuned .pt, registry URI), a checkpoint's own
student.safetensors accepted by the loader, and the README snippet executed exactly as printed, its embeddings
equal to the training front-end's and the registered pyfunc's within 1e-5."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile
import torch

from jobs import export as export_job
from jobs import register as register_job
from jobs.train.checkpointing import STUDENT_FILE, manifest_for_files
from jobs.train.config import load_config
from model.checkpoint import CheckpointError, load_weights
from model.features import extract_features
from model.sslam import SSLAM
from pipeline.audio import fbank_batch, to_model_rate
from pipeline.config import AudioConfig
from registry_support import Payload, seeded_checkpoint, use_store
from test_checkpoint import NUM_CLASSES, finetune_checkpoint

# The README's "Use the encoder" snippet, character for character (notes/export.md): executed below in a folder
# holding `exported/` and `clip.wav`.
README_SNIPPET = """\
import soundfile
from model import load_encoder
encoder = load_encoder("exported/")
waveform, sample_rate = soundfile.read("clip.wav", dtype="float32")
embeddings = encoder.embed(waveform, sample_rate)  # {"utterance": (D,), "frames": (N, D)}
"""

MODEL = "sslam-export"


@pytest.fixture(scope="module")
def config():
    return load_config("tiny_stage1", [f"tracking.model_name={MODEL}"])


def checkpoint_folder(run_dir: Path, config, updates: int, complete: bool = True, marker: Path | None = None) -> Path:
    """A checkpoint folder as jobs.train.checkpointing writes it (config.yaml, student.safetensors, a pickled DeepSpeed
    file that touches `marker` when unpickled), committed by a manifest unless `complete` is False."""
    tag_dir, _ = seeded_checkpoint(run_dir, config, updates)
    payload = Payload(marker or run_dir / "pickle-ran")
    torch.save({"module": {}, "hook": payload}, tag_dir / "mp_rank_00_model_states.pt")
    if complete:
        manifest_for_files(tag_dir)
    return tag_dir


def tone(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    wave = wave.astype(np.float32)
    return wave if channels == 1 else np.stack([wave, 0.5 * wave], axis=1)


def training_front_end_embedding(encoder, wave: np.ndarray, rate: int, audio: AudioConfig) -> np.ndarray:
    """What the training / pyfunc front-end (pipeline.audio) gives: down-mix, to_model_rate, fbank_batch."""
    mono = wave.mean(axis=1, dtype=np.float32) if wave.ndim == 2 else wave
    fbank = fbank_batch([to_model_rate(mono, rate, audio)], audio)
    return extract_features(encoder, fbank)["utterance"][0].numpy()


def test_checkpoint_student_safetensors_is_accepted_by_the_loader(tmp_path, config):
    tag_dir = checkpoint_folder(tmp_path / "run", config, 4)
    with pytest.raises(CheckpointError, match="config="):
        load_weights(tag_dir / STUDENT_FILE)  # no config inside: refused with what is needed, not a format error
    weights = load_weights(tag_dir / STUDENT_FILE, config=config.model)
    torch.manual_seed(4)
    model = SSLAM(config.model)
    assert weights.kind == "pretrain" and weights.decoder is not None
    assert all(torch.equal(weights.student_encoder[k], v) for k, v in model.encoder.state_dict().items())
    assert not (tmp_path / "run" / "pickle-ran").exists()


def test_run_folder_exports_its_newest_complete_checkpoint_and_the_snippet_runs(tmp_path, config, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    marker = tmp_path / "pickle-ran"
    checkpoint_folder(run_dir, config, 4, marker=marker)
    checkpoint_folder(run_dir, config, 8, complete=False, marker=marker)  # no manifest: its writing did not finish
    monkeypatch.chdir(tmp_path)
    assert export_job.main([str(run_dir), "exported"]) == 0
    assert "no head" in capsys.readouterr().out
    spec = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert spec["source"].endswith("update_00000004")
    assert spec["audio"] == {**AudioConfig(mel_bins=64, target_length=512).__dict__}
    assert spec["model"]["embed_dim"] == 32 and spec["classes"] is None
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["config.json", "model.safetensors"]
    assert not marker.exists()  # DeepSpeed's pickles were never opened
    assert export_job.main([str(run_dir), "exported"]) == 1  # never overwrites

    stereo = tone(3.0, 44100, channels=2)
    soundfile.write(tmp_path / "clip.wav", stereo, 44100, subtype="FLOAT")
    scope: dict = {}
    exec(README_SNIPPET, scope)
    embeddings = scope["embeddings"]
    assert embeddings["utterance"].shape == (32,)
    assert embeddings["frames"].shape == (config.model.num_patches, 32)

    torch.manual_seed(4)
    encoder = SSLAM(config.model).encoder.eval()
    expected = training_front_end_embedding(encoder, stereo, 44100, config.data.audio)
    np.testing.assert_allclose(embeddings["utterance"], expected, atol=1e-5, rtol=0)
    # Other rates, and a clip longer than the target length (head crop, as in training).
    for seconds, rate in ((2.0, 16000), (1.5, 8000), (7.0, 22050)):
        wave = tone(seconds, rate, seed=rate)
        got = scope["encoder"].embed(wave, rate)["utterance"]
        np.testing.assert_allclose(got, training_front_end_embedding(encoder, wave, rate, config.data.audio),
                                   atol=1e-5, rtol=0)


def test_checkpoint_folder_loads_directly_and_partial_checkpoint_is_refused(tmp_path, config):
    from model import load_encoder

    complete = checkpoint_folder(tmp_path / "run", config, 4)
    partial = checkpoint_folder(tmp_path / "run", config, 8, complete=False)
    wave = tone(1.0, 16000)
    direct = load_encoder(complete).embed(wave, 16000)["utterance"]
    out = export_job.write_export(export_job.resolve_source(str(complete)), tmp_path / "out")
    np.testing.assert_array_equal(load_encoder(out).embed(wave, 16000)["utterance"], direct)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        export_job.resolve_source(str(partial))


def test_export_reads_student_safetensors_only(tmp_path, config, monkeypatch):
    """One route to the fp32 student: DeepSpeed's consolidation (zero_to_fp32) is never imported, and a folder with
    only DeepSpeed's files is refused naming student.safetensors, its pickle unopened."""
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", None)  # importing it raises ImportError
    marker = tmp_path / "pickle-ran"
    complete = checkpoint_folder(tmp_path / "run", config, 4, marker=marker)
    export_job.write_export(export_job.resolve_source(str(complete)), tmp_path / "out")
    (complete / STUDENT_FILE).unlink()
    with pytest.raises(CheckpointError, match=STUDENT_FILE):
        export_job.resolve_source(str(complete))
    assert not marker.exists()


def test_official_finetuned_file_exports_head_and_labels(tmp_path):
    from model import PretrainedEncoder

    path = tmp_path / "EAT_finetuned.pt"
    torch.save(finetune_checkpoint(), path)
    labels = tmp_path / "class_labels_indices.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f"{i},/m/{i},sound {i}\n" for i in range(NUM_CLASSES)))
    assert export_job.main([str(path), str(tmp_path / "out"), "--class-labels", str(labels)]) == 0
    spec = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [c["name"] for c in spec["classes"]] == [f"sound {i}" for i in range(NUM_CLASSES)]
    encoder = PretrainedEncoder.from_pretrained(tmp_path / "out")
    result = encoder.embed(tone(0.7, 16000), 16000)
    assert result["scores"].shape == (NUM_CLASSES,)
    assert result["labels"][0] == f"sound {int(np.argmax(result['scores']))}"


@pytest.fixture
def store(tmp_path, monkeypatch):
    use_store(monkeypatch, tmp_path)
    return SimpleNamespace(root=tmp_path)


def test_registry_uri_exports_the_verified_version_matching_the_pyfunc(store, config):
    import mlflow

    from model import load_encoder

    tag_dir = checkpoint_folder(store.root / "runs" / "a", config, 4)
    assert register_job.main(["--checkpoint", str(tag_dir)]) == 0
    out = export_job.write_export(export_job.resolve_source(f"models:/{MODEL}/1"), store.root / "out")
    spec = json.loads((out / "config.json").read_text())
    assert spec["source"] == f"models:/{MODEL}/1"

    wave = tone(2.5, 32000)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/1", model_config={"device": "cpu"})
    outputs = pyfunc.predict(pd.DataFrame({"waveform": [wave.tolist()], "sample_rate": [32000]}))
    ours = load_encoder(out).embed(wave, 32000)
    np.testing.assert_allclose(ours["utterance"], outputs["utterance"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours["frames"], outputs["frames"][0], atol=1e-5, rtol=0)
