"""The fine-tuning job's best classifier: its folder on disk and its registration as a classifier version.

The best checkpoint (by eval mAP) lives in `<output_dir>/best/`: `classifier.safetensors` (a "finetune"
ImportedCheckpoint: student encoder + fc_norm/head, model.checkpoint.save_weights) and `best.json` (update, mAP,
the eval metrics, the class list, the front-end). It is replaced as a whole (written beside, then renamed).

Registration reuses jobs.mlops.registration and jobs.mlops.registry: the same signed pending folder under
`<output_dir>/registrations/`, the same pyfunc (with a head, so predict returns logits / top labels), the same
upload and alias rules. The registered
model is `<tracking.model_name>-classifier`; the version's tags carry `kind=finetune`, `source=finetune`, the
update and every eval metric (`eval.mAP`, `eval.baseline_mAP`, ...). `tracking.register` decides when: `never`,
`end` (the best of a run that finished) or `every_checkpoint` (each new best when it is written);
`tracking.aliases` are the aliases each registration moves. `ClassifierTracker` is jobs.mlops.tracking's Tracker with
that export in place of the encoder's.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from jobs.mlops.registration import (
    DONE_FILE,
    PENDING_FILE,
    Registration,
    _stage_folder,
    encoder_name,
    registrations_dir,
)
from jobs.train.checkpointing import tag_for
from jobs.mlops.tracking import Tracker
from model.checkpoint import ImportedCheckpoint, load_weights, save_weights
from pipeline.atomic import publish_folder
from pipeline.config import AudioConfig

log = logging.getLogger("sslam.classifier_registry")

BEST_DIR = "best"
BEST_WEIGHTS = "classifier.safetensors"
BEST_RECORD = "best.json"
CLASSIFIER_SUFFIX = "-classifier"


def classifier_model_name(encoder_model_name: str) -> str:
    return encoder_model_name + CLASSIFIER_SUFFIX


def write_best(output_dir: str | Path, weights: ImportedCheckpoint, record: dict) -> Path:
    """Replace `<output_dir>/best/` by these weights and record (rank 0)."""
    best = Path(output_dir) / BEST_DIR
    staging = best.with_name(BEST_DIR + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_weights(weights, staging / BEST_WEIGHTS)
    (staging / BEST_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
    previous = best.with_name(BEST_DIR + ".previous")
    publish_folder(staging, best, keep_previous=previous)
    shutil.rmtree(previous, ignore_errors=True)
    return best


def read_best(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / BEST_DIR / BEST_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def export_classifier(best_dir: str | Path, run_dir: str | Path, config, *, run_id: str | None = None,
                      tracking_uri: str | None = None, dataset_fingerprint: str = "") -> Path:
    """Stage `best_dir` as a signed pending registration of the classifier model (no MLflow call); returns
    `<run_dir>/registrations/classifier_update_XXXXXXXX/`."""
    best_dir = Path(best_dir)
    record = json.loads((best_dir / BEST_RECORD).read_text())
    updates = int(record["update"])
    folder = registrations_dir(run_dir) / f"classifier_{tag_for(updates)}"
    if (folder / DONE_FILE).is_file() or (folder / PENDING_FILE).is_file():
        return folder
    weights = load_weights(best_dir / BEST_WEIGHTS)
    weights.num_updates = updates
    metric_tags = {f"eval.{name}": repr(float(value)) for name, value in record["metrics"].items()}
    registration = Registration(
        model_name=classifier_model_name(config.tracking.model_name),
        experiment=config.tracking.experiment,
        tags={
            "run_id": run_id or "",
            "update": str(updates),
            "stage": "finetune",
            "kind": "finetune",
            "encoder": encoder_name(weights.config),
            "dataset_fingerprint": dataset_fingerprint,
            "source": "finetune",
            "init_from": str(config.finetune.source),
            "checkpoint": str(best_dir.resolve()),
            "eval.split": f"{record['eval_shards']}:{record['eval_split']}",
            **metric_tags,
        },
        aliases=list(config.tracking.aliases),
        tracking_uri=tracking_uri,
        run_id=run_id,
        updates=updates,
    )
    _stage_folder(folder, weights, registration, audio_cfg=AudioConfig(**record["audio"]),
                           classes=record["classes"], pooling=record["pooling"])
    log.info("exported the classifier of update %d (mAP %.4f) to %s (pending registration)", updates,
             record["metrics"]["mAP"], folder)
    return folder


class ClassifierTracker(Tracker):
    """jobs.mlops.tracking.Tracker whose registrations are the best classifier (module docstring): call
    `on_checkpoint(best_dir, update)` when a new best is written, and `remember_best` after a resume."""

    entry_point = "jobs.finetune"

    def remember_best(self, best_dir: Path, updates: int) -> None:
        self._last_checkpoint = (Path(best_dir), int(updates))

    def _export_now(self, tag_dir: Path, updates: int) -> None:
        export_classifier(tag_dir, self.run_dir, self.config, run_id=self.run_id, tracking_uri=self.uri,
                          dataset_fingerprint=str(self.dataset_info.get("fingerprint", "")))
