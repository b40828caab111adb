"""Shared helpers of the reliability suite: running the real entry points, judging how they fail, and the
"hostile" AudioSet-style dataset (every bad audio kind and every bad CSV row kind beside valid clips).

An entry point fails *cleanly* when it exits with the expected non-zero code, says what is wrong in a line
that names the offending key or path, and prints no Python traceback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import yaml

from pipeline.config import SynthConfig
from pipeline.synth import make_sample_dataset
from test_audio import BAD_FILES, make_bad_file

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(sys.executable).parent
PRETRAIN = str(REPO / "jobs" / "pretrain.py")

# Front-end shapes of every preprocessing run here (tiny, for CPU).
T, F, PATCH, G, EPOCHS = 128, 32, 16, 3, 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment of a child process: CPU DeepSpeed, one thread, the repository importable."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def single_rank_env(**extra: str) -> dict[str, str]:
    """What the deepspeed launcher would set for a world of one rank."""
    ranks = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(free_port())}
    return cpu_env(**ranks, **extra)


def run_command(command: list[str], cwd: Path, env: dict[str, str] | None = None,
                timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)


def assert_clean_failure(result: subprocess.CompletedProcess, code: int | None, *needles: str) -> None:
    """Exit `code` (None: any non-zero code), no traceback, and one stderr line holding every needle."""
    output = f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    assert "Traceback (most recent call last)" not in result.stderr + result.stdout, output
    assert result.returncode == code if code is not None else result.returncode != 0, output
    lines = result.stderr.splitlines()
    assert any(all(needle in line for needle in needles) for line in lines), f"no line names {needles}\n{output}"


# ---------------------------------------------------------------------------------------------------------
# The hostile dataset


BAD_AUDIO_STAGE = {case: ("manifest", "missing_file") if reason == "missing" else ("decode", reason)
                   for case, reason in BAD_FILES.items()}
# Bad CSV rows of the train split: key -> (row text after the key, expected reason). Their keys have valid
# audio files, so the row itself is the only problem.
BAD_CSV_ROWS = {
    "csv-three-columns": (" 0.000, 10.000", "bad_csv_row"),
    "csv-five-columns": (' 0.000, 10.000, "{mid}", surplus', "bad_csv_row"),
    "csv-start-after-end": (' 9.000, 1.000, "{mid}"', "bad_csv_row"),
    "csv-nan-start": (' nan, 10.000, "{mid}"', "bad_csv_row"),
    "csv-text-time": (' soon, 10.000, "{mid}"', "bad_csv_row"),
    "csv-unknown-mid": (' 0.000, 10.000, "{mid},/m/not_a_class"', "unknown_label"),
    "csv-no-file": (' 0.000, 10.000, "{mid}"', "missing_file"),
}
EXTENSION_LIES = "ext-lies-flac-named-wav"
EVAL_CORRUPT = "eval-random-bytes"


@dataclass
class HostileDataset:
    root: Path
    audio: Path
    train_csv: Path
    eval_csv: Path
    class_csv: Path
    good_train: set[str]
    good_eval: set[str]
    bad_audio: dict[str, str] = field(default_factory=dict)  # key -> BAD_FILES case
    audio_paths: dict[str, Path] = field(default_factory=dict)  # key -> file written for it
    duplicate_key: str = ""


def _tone_file(path: Path, seconds: float = 2.0, rate: int = 16000, fmt: str | None = None) -> None:
    t = np.arange(round(seconds * rate)) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 660.0 * t)).astype(np.float32), rate, format=fmt)


def _data_keys(csv: Path) -> list[str]:
    return [line.split(",")[0].strip() for line in csv.read_text().splitlines() if line.strip() and line[0] != "#"]


def build_hostile_dataset(root: Path) -> HostileDataset:
    """A generated sample dataset plus one train row per bad audio kind, one per bad CSV row kind, a duplicate
    key, a valid FLAC named .wav, and a corrupt file in the eval split."""
    make_sample_dataset(root, SynthConfig(train_clips=12, eval_clips=4, broken_files=False, seed=7))
    audio = root / "audio"
    data = HostileDataset(
        root=root, audio=audio, train_csv=root / "balanced_train_segments.csv",
        eval_csv=root / "eval_segments.csv", class_csv=root / "class_labels_indices.csv",
        good_train=set(_data_keys(root / "balanced_train_segments.csv")),
        good_eval=set(_data_keys(root / "eval_segments.csv")),
    )
    mid = data.class_csv.read_text().splitlines()[1].split(",")[1]
    train_rows, eval_rows = [], []
    workspace = root / "_bad_files"
    for case in sorted(BAD_FILES):
        key = f"bad-{case.replace('_', '-')}"
        folder = workspace / case
        folder.mkdir(parents=True)
        made = make_bad_file(folder, case)
        if made.exists():
            target = audio / f"{key}{made.suffix}"
            shutil.copyfile(made, target)
            data.audio_paths[key] = target
        data.bad_audio[key] = case
        train_rows.append(f'{key}, 0.000, 10.000, "{mid}"')
    lying = audio / f"{EXTENSION_LIES}.wav"
    _tone_file(lying, rate=22050, fmt="FLAC")
    data.audio_paths[EXTENSION_LIES] = lying
    data.good_train.add(EXTENSION_LIES)
    train_rows.append(f'{EXTENSION_LIES}, 0.000, 10.000, "{mid}"')
    for key, (rest, reason) in BAD_CSV_ROWS.items():
        if reason != "missing_file":
            _tone_file(audio / f"{key}.wav")
        train_rows.append(key + "," + rest.format(mid=mid))
    data.duplicate_key = sorted(data.good_train - {EXTENSION_LIES})[0]
    train_rows.append(f'{data.duplicate_key}, 20.000, 30.000, "{mid}"')
    corrupt = audio / f"{EVAL_CORRUPT}.wav"
    corrupt.write_bytes(np.random.default_rng(1).bytes(20000))
    data.audio_paths[EVAL_CORRUPT] = corrupt
    eval_rows.append(f'{EVAL_CORRUPT}, 0.000, 10.000, "{mid}"')
    with open(data.train_csv, "a") as handle:
        handle.write("\n".join(train_rows) + "\n")
    with open(data.eval_csv, "a") as handle:
        handle.write("\n".join(eval_rows) + "\n")
    return data


def preprocess_config(path: Path, data: HostileDataset, output: Path, eval_csv: Path | None = None) -> Path:
    """A job YAML over the hostile dataset (unusual extensions allowed, so they reach the decoder)."""
    document = {
        "name": "reliability",
        "data": {
            "audio": {"target_length": T, "mel_bins": F},
            "source": {
                "kind": "audioset",
                "audio_root": str(data.audio),
                "class_labels_csv": str(data.class_csv),
                "extensions": ["wav", "flac", "ogg", "mp3", "m4a", "xyz"],
                "splits": [
                    {"name": "train", "csv": str(data.train_csv), "mix": True},
                    {"name": "eval", "csv": str(eval_csv or data.eval_csv), "mix": False},
                ],
            },
            "mixing": {"group_size": G, "mixture_epochs": EPOCHS},
            "shards": {"output": str(output), "groups_per_shard": 3, "clips_per_eval_shard": 4, "seed": 3},
            "loader": {"micro_batch_clips": 6},
        },
        "model": {"target_length": T, "mel_bins": F, "patch_size": PATCH},
    }
    path.write_text(yaml.safe_dump(document))
    return path
