"""What the tracking and registry tests build on: a clean MLflow environment whose project-level store (and
registration signing key) lands in a folder, checkpoint folders of a seeded tiny model, and a pickle that
betrays being unpickled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jobs.mlops import registration
from jobs.train.checkpointing import STUDENT_FILE
from jobs.train.config import dump_yaml
from jobs.mlops.tracking import HTTP_DEFAULTS
from model.sslam import SSLAM

# Cleared for each test (and restored after): Tracker.start sets the HTTP ones for its process.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
              "MLFLOW_RUN_ID", *HTTP_DEFAULTS)


def use_store(patch: pytest.MonkeyPatch, root: Path, signing_key: bool = True) -> None:
    """No MLflow variables and root as the working directory, so the project-level store lands there; with
    `signing_key`, a registration key of its own under root/keys."""
    for name in MLFLOW_ENV:
        patch.delenv(name, raising=False)
    patch.chdir(root)
    if signing_key:
        patch.setenv(registration.KEY_ENV, str(root / "keys" / "registration.key"))


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def seeded_checkpoint(run_dir: Path, config, updates: int, student: bool = True) -> tuple[Path, SSLAM]:
    """run_dir/checkpoints/update_<updates> with config.yaml and (unless `student` is False) the
    student.safetensors of a model seeded with `updates`; returns the folder and the model."""
    torch.manual_seed(updates)
    model = SSLAM(config.model)
    tag_dir = run_dir / "checkpoints" / f"update_{updates:08d}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "config.yaml").write_text(dump_yaml(config))
    if student:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tag_dir / STUDENT_FILE))
    return tag_dir, model
