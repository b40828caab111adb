"""A tiny folder source of clips of varied length (`path,labels` CSVs, a class list) and its preprocessing config.

Quiet noise (every raw log-mel value below 0, so padding zeros stand out). Durations are chosen against the tiny
front-end (16 kHz, T = 128 frames of 10 ms, min_duration_s 0.625): "Dog" clips are all too short (quarantined),
one "Bird" clip of four is, and the written "Bird" clips are shorter than T (zero-padded); the one "Owl" file the
train CSV lists does not exist. So the set shows classes that vanish at the decode and at the manifest stage, a
class that lost a little, and padding. `preprocess_folder_set` writes it and runs the Ray preprocessing on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import soundfile
import yaml

from jobs.train.config import load_config
from jobs.preprocess import run_preprocess

T, F, PATCH = 128, 32, 16
RATE = 16000
CLASSES = [("/m/dog", "Dog"), ("/m/cat", "Cat"), ("/m/bird", "Bird"), ("/m/owl", "Owl")]
# split -> (file stem, display label, seconds)
CLIPS = {
    "train": [(f"dog{i}", "Dog", 0.3) for i in range(4)]
    + [(f"cat{i}", "Cat", 2.0) for i in range(5)]
    + [(f"bird{i}", "Bird", 0.8) for i in range(3)]
    + [("bird_short", "Bird", 0.3)],
    "eval": [("e_cat", "Cat", 2.0), ("e_dog", "Dog", 0.3), ("e_bird", "Bird", 0.8)],
}


def write_folder_set(root: Path) -> Path:
    """Audio under root/audio, one CSV per split, the class list; returns the config YAML path."""
    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir(parents=True)
    (root / "classes.csv").write_text(
        "index,mid,display_name\n" + "".join(f"{i},{mid},{name}\n" for i, (mid, name) in enumerate(CLASSES))
    )
    for split, clips in CLIPS.items():
        lines = ["path,labels"]
        for stem, label, seconds in clips:
            wave = (0.001 * rng.standard_normal(int(seconds * RATE))).astype(np.float32)
            soundfile.write(audio / f"{stem}.wav", wave, RATE)
            lines.append(f"{stem}.wav,{label}")
        if split == "train":
            lines.append("owl_gone.wav,Owl")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    document = {
        "name": "folder-set",
        "data": {
            "audio": {"target_length": T, "mel_bins": F},
            "source": {
                "kind": "folder",
                "audio_root": str(audio),
                "class_labels_csv": str(root / "classes.csv"),
                "splits": [
                    {"name": "train", "csv": str(root / "train.csv"), "mix": True},
                    {"name": "eval", "csv": str(root / "eval.csv"), "mix": False},
                ],
            },
            "mixing": {"group_size": 3, "mixture_epochs": 1},
            "shards": {"output": str(root / "shards"), "groups_per_shard": 4, "clips_per_eval_shard": 4},
        },
        "model": {"target_length": T, "mel_bins": F, "patch_size": PATCH},
    }
    path = root / "folder.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def preprocess_folder_set(root: Path) -> dict:
    """Write the set under root and preprocess it on a local Ray (shards in root/shards); returns the summary."""
    config = load_config(str(write_folder_set(root)))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return run_preprocess(config, progress=False)
    finally:
        ray.shutdown()
