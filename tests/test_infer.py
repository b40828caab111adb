"""`sslam infer` for real use (jobs/infer.py, pipeline/windows.py): long files in windows of the model's target
length with their start times, the last partial window padded and marked, a short file as one window, files +
folders + globs, a Parquet output with the file keys (and top labels with a head), and memory on a 1-hour file
that stays at a 10-second file's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile
import torch

from jobs import infer as infer_job
from jobs.train.config import load_config
from jobs.export import Exportable, from_official, write_export
from jobs.mlops.pyfunc_package import audio_config_for
from model import load_encoder
from model.checkpoint import ImportedCheckpoint
from model.sslam import SSLAM
from pipeline.audio import frame_count
from test_checkpoint import NUM_CLASSES, finetune_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WINDOW_S = 0.025 + 511 * 0.010  # tiny_stage1: 512 frames of 10 ms plus one 25 ms frame
HOP_S = 5.12  # default hop: the target length's span


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny encoder (tiny_stage1: 512 frames x 64 mel bins) exported as `sslam export` writes it."""
    config = load_config("tiny_stage1")
    torch.manual_seed(0)
    weights = ImportedCheckpoint(config=config.model, kind="encoder",
                                 student_encoder=dict(SSLAM(config.model).encoder.state_dict()))
    out = tmp_path_factory.mktemp("infer") / "exported"
    return write_export(Exportable(weights, audio_config_for(config.model, config.data.audio), "test"), out)


def noise(path: Path, seconds: float, rate: int = 16000, seed: int = 0, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (int(seconds * rate),) if channels == 1 else (int(seconds * rate), channels)
    wave = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    soundfile.write(path, wave, rate)
    return wave


def test_30_s_file_yields_ceil_windows_at_their_start_times(exported, tmp_path, capsys):
    wave = noise(tmp_path / "long.wav", 30.0)
    out = tmp_path / "windows.parquet"
    assert infer_job.main([str(tmp_path / "long.wav"), "--model", str(exported), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6 windows of 5.135 s every 5.12 s" in printed and "padded after 438 frames" in printed
    table = pd.read_parquet(out)
    assert len(table) == math.ceil(30.0 / HOP_S) == 6
    np.testing.assert_allclose(table["start_s"], [k * HOP_S for k in range(6)], atol=1e-9)
    assert table["partial"].tolist() == [False] * 5 + [True]
    assert table["valid_frames"].tolist() == [512] * 5 + [frame_count(round((30.0 - 25.6) * 16000), load_encoder(
        exported).front_end)]
    assert table["end_s"].iloc[-1] == pytest.approx(30.0)
    shape = json.loads(pq.read_schema(out).metadata[b"frames_shape"])
    assert shape == [32, 4, 32] and len(table["frames"].iloc[0]) == 32 * 4 * 32

    # Every window is the embedding of that span cut out of the file, the partial one included.
    encoder = load_encoder(exported)
    for k in (1, 5):
        start = round(k * HOP_S * 16000)
        span = wave[start : start + math.ceil(WINDOW_S * 16000)]
        np.testing.assert_allclose(table["utterance"].iloc[k], encoder.embed(span, 16000)["utterance"], atol=1e-5)

    overlapping = tmp_path / "hop.parquet"
    assert infer_job.main([str(tmp_path / "long.wav"), "--model", str(exported), "--hop", "2.5",
                           "--out", str(overlapping), "--no-frames"]) == 0
    table = pd.read_parquet(overlapping)
    assert len(table) == 1 + math.ceil((30.0 - WINDOW_S) / 2.5) == 11 and "frames" not in table
    np.testing.assert_allclose(table["start_s"], [2.5 * k for k in range(11)], atol=1e-9)
    assert table["partial"].tolist() == [False] * 10 + [True]
    assert infer_job.main([str(tmp_path / "long.wav"), "--model", str(exported), "--hop", "6"]) == 2  # would skip audio


def test_folders_globs_and_short_files_with_file_keys(exported, tmp_path, capsys):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    noise(folder / "a.wav", 12.0)
    noise(folder / "sub" / "b.flac", 2.0, rate=44100, channels=2)  # shorter than one window: one window
    (folder / "notes.txt").write_text("not audio")
    other = tmp_path / "other"
    other.mkdir()
    noise(other / "c.wav", 6.0, rate=8000)
    noise(other / "d.ogg", 1.0)
    out = tmp_path / "all.parquet"
    assert infer_job.main([str(folder), str(other / "*.wav"), str(other / "d.ogg"), "--model", str(exported),
                           "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    counts = table.groupby("file").size().to_dict()
    assert counts == {str(folder / "a.wav"): 3, str(folder / "sub" / "b.flac"): 1, str(other / "c.wav"): 2,
                      str(other / "d.ogg"): 1}
    short = table[table["file"] == str(folder / "sub" / "b.flac")].iloc[0]
    assert short["partial"] and short["valid_frames"] == frame_count(2 * 16000, load_encoder(exported).front_end)
    capsys.readouterr()

    # A pattern matching nothing and a missing file are reported, the rest is still embedded, the exit status is 1.
    assert infer_job.main([str(tmp_path / "none" / "*.wav"), str(tmp_path / "missing.wav"), str(other / "c.wav"),
                           "--model", str(exported), "--out", str(tmp_path / "some.parquet")]) == 1
    err = capsys.readouterr().err
    assert "no file matches" in err and f"cannot read {tmp_path / 'missing.wav'}: missing" in err
    assert pd.read_parquet(tmp_path / "some.parquet")["file"].unique().tolist() == [str(other / "c.wav")]


def test_model_with_a_head_writes_top_labels(tmp_path, capsys):
    path = tmp_path / "EAT_finetuned.pt"
    torch.save(finetune_checkpoint(), path)  # 64 frames x 32 mel bins: windows of 0.655 s
    model = write_export(from_official(path), tmp_path / "tagger")
    noise(tmp_path / "clip.wav", 2.0)
    out = tmp_path / "tags.parquet"
    assert infer_job.main([str(tmp_path / "clip.wav"), "--model", str(model), "--top-k", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 windows of 0.655 s every 0.64 s" in printed and " 1. class " in printed and " 3. " not in printed
    table = pd.read_parquet(out)
    assert len(table) == 4 and all(len(labels) == 2 for labels in table["top_labels"])
    scores = np.stack(table["top_scores"])
    assert (np.diff(scores, axis=1) <= 0).all()
    assert all(label.startswith("class ") and int(label.split()[1]) < NUM_CLASSES for label in table["top_labels"][0])


PEAK_RSS = """\
import resource, sys
from jobs.infer import main
code = main([sys.argv[1], "--model", sys.argv[2], "--out", sys.argv[3]])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_long_file(path: Path, seconds: int, rate: int = 16000) -> None:
    """16-bit noise written a minute at a time (the test itself never holds the file)."""
    rng = np.random.default_rng(1)
    with soundfile.SoundFile(path, "w", rate, 1, subtype="PCM_16") as handle:
        for start in range(0, seconds, 60):
            handle.write((0.1 * rng.standard_normal(min(60, seconds - start) * rate)).astype(np.float32))


def peak_rss_kib(audio: Path, model: Path, out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(audio), str(model), str(out)], env=env,
                            capture_output=True, text=True, timeout=600, check=True)
    code, peak = result.stdout.strip().splitlines()[-1].split()
    assert code == "0", result.stderr
    return int(peak)


def test_one_hour_file_streams_in_bounded_memory(exported, tmp_path):
    write_long_file(tmp_path / "hour.wav", 3600)  # 115 MB of PCM; 230 MB as float32 if decoded whole
    write_long_file(tmp_path / "short.wav", 10)
    short = peak_rss_kib(tmp_path / "short.wav", exported, tmp_path / "short.parquet")
    hour = peak_rss_kib(tmp_path / "hour.wav", exported, tmp_path / "hour.parquet")
    assert hour - short < 100 * 1024, (short, hour)  # a whole-file decode alone would add 230 MB
    assert hour < 1.1 * short, (short, hour)
    table = pd.read_parquet(tmp_path / "hour.parquet", columns=["window", "start_s", "partial"])
    assert len(table) == 1 + math.ceil((3600 - WINDOW_S) / HOP_S) == 704
    assert table["start_s"].iloc[-1] == pytest.approx(703 * HOP_S) and table["partial"].tolist()[-1]


def test_tail_shorter_than_a_frame_is_padded_and_a_cut_file_is_reported(exported, tmp_path, capsys):
    from pipeline.windows import plan_windows, stream_windows

    audio = load_encoder(exported).front_end
    noise(tmp_path / "tail.wav", 10.26)  # the third window holds 20 ms: less than one 25 ms frame
    cfg = infer_job.audio_config_of(load_encoder(exported))
    windows = list(stream_windows(tmp_path / "tail.wav", cfg))
    assert [(w.start_s, w.valid_frames, w.partial) for w in windows] == [
        (0.0, 512, False), (5.12, 512, False), (10.24, 1, True)]
    assert windows[-1].wave.numel() == audio.window_samples and plan_windows(tmp_path / "tail.wav", cfg).count == 3

    noise(tmp_path / "whole.flac", 60.0)
    data = (tmp_path / "whole.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])  # header intact, half of the frames gone
    out = tmp_path / "mixed.parquet"
    assert infer_job.main([str(tmp_path / "cut.flac"), str(tmp_path / "tail.wav"), "--model", str(exported),
                           "--out", str(out), "--batch", "2"]) == 1
    assert f"cannot read {tmp_path / 'cut.flac'}: corrupt" in capsys.readouterr().err
    counts = pd.read_parquet(out, columns=["file"]).groupby("file").size().to_dict()
    assert counts[str(tmp_path / "tail.wav")] == 3
    assert 0 < counts[str(tmp_path / "cut.flac")] < math.ceil(60 / HOP_S)  # the windows before the damage
