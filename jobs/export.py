"""`sslam export SOURCE OUT`: an encoder as a plain folder (`config.json` + `model.safetensors`) that
`model.load_encoder(OUT)` reads (model/pretrained.py owns the format).

SOURCE is one of
* a registry URI `models:/NAME@ALIAS` / `models:/NAME/VERSION`: its files are checked against the version's sha256
  tags before its code runs (jobs.mlops.registry.load_verified), then the loaded encoder (+ head, class names) is saved;
* a run folder (holding `checkpoints/`): its newest complete checkpoint (jobs.train.checkpointing.latest_complete, the
  manifest check that resume uses);
* a checkpoint folder: its `student.safetensors` (`encoder.` keys of the full student) and `config.yaml`; never
  DeepSpeed's pickles;
* an official EAT / SSLAM `.pt` file (model.official.import_official, weights_only with the numpy allow-list).

`config.json` holds the ModelConfig, the front-end settings (AudioConfig: sample rate, mel bins, frame length and
shift, target length), the pooling, the class names of a head (or null), the source and the weights' sha256. OUT is
written beside itself and renamed into place: a half-written export never carries the final name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.train.checkpointing import STUDENT_FILE, TAG_PATTERN, checkpoint_root, latest_complete, verify
from model.checkpoint import CheckpointError, ImportedCheckpoint, load_weights, save_weights
from model.official import import_official
from model.pretrained import CONFIG_FILE, EXPORT_FORMAT, EXPORT_VERSION, WEIGHTS_FILE, checkpoint_configs
from pipeline.atomic import publish_folder
from pipeline.config import AudioConfig

log = logging.getLogger("sslam.export")


@dataclass
class Exportable:
    """What an export holds: encoder (+ head) weights, the front-end, class names and pooling, and where from."""

    weights: ImportedCheckpoint
    audio: AudioConfig
    source: str
    classes: list[dict] | None = None
    pooling: str = "cls"


def _audio_for(weights: ImportedCheckpoint, audio: dict | AudioConfig | None) -> AudioConfig:
    from jobs.mlops.pyfunc_package import audio_config_for

    if isinstance(audio, dict):
        audio = AudioConfig(**audio)
    return audio_config_for(weights.config, audio)


def from_registry(uri: str) -> Exportable:
    """A registered version, checked against its sha256 tags first (jobs.mlops.registry.load_verified)."""
    from jobs.mlops.registry import load_verified

    _, exact, model = load_verified(uri, model_config={"device": "cpu"})
    python_model = model.unwrap_python_model()
    encoder = {key: value.detach().cpu() for key, value in python_model.encoder.state_dict().items()}
    head = None
    if python_model.classifier is not None:
        head = {key: value.detach().cpu() for key, value in python_model.classifier.state_dict().items()}
    weights = ImportedCheckpoint(
        config=python_model.model_cfg, kind="finetune" if head else "encoder", student_encoder=encoder, head=head
    )
    return Exportable(weights, _audio_for(weights, dataclasses.asdict(python_model.audio_cfg)), exact,
                      python_model.classes if head else None, python_model.pooling)


def from_checkpoint(folder: Path) -> Exportable:
    """A checkpoint folder's student encoder, from its student.safetensors and config.yaml (no pickle opened)."""
    problem = verify(folder)
    if problem is not None:
        raise CheckpointError(f"{folder} is not a complete checkpoint: {problem}")
    model_cfg, audio = checkpoint_configs(folder / "config.yaml")
    full = load_weights(folder / STUDENT_FILE, config=model_cfg)
    tag = TAG_PATTERN.match(folder.name)
    weights = ImportedCheckpoint(config=model_cfg, kind="encoder", student_encoder=full.student_encoder,
                                 num_updates=int(tag.group(1)) if tag else 0)
    return Exportable(weights, _audio_for(weights, audio), str(folder.resolve()))


def from_run(run_dir: Path) -> Exportable:
    """The newest complete checkpoint of a run folder; newer partial ones are reported and skipped."""
    choice = latest_complete(checkpoint_root(run_dir))
    for tag, why in choice.skipped:
        log.warning("skipping checkpoint %s: %s", tag, why)
    if choice.folder is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint under {checkpoint_root(run_dir)}")
    return from_checkpoint(choice.folder)


def from_official(path: Path, class_labels_csv: str | None = None, trusted: bool = False) -> Exportable:
    from pipeline.csv_rows import read_class_labels

    weights = import_official(path, trusted=trusted)
    classes = None
    if weights.head is not None:
        if class_labels_csv:
            labels = read_class_labels(class_labels_csv)
            classes = [{"index": c.index, "mid": c.mid, "name": c.display_name} for c in labels]
        else:
            count = int(weights.head["head.weight"].shape[0])
            classes = [{"index": i, "mid": "", "name": f"class {i}"} for i in range(count)]
    return Exportable(weights, _audio_for(weights, None), str(path.resolve()), classes)


def resolve_source(source: str, class_labels_csv: str | None = None, trusted: bool = False) -> Exportable:
    if source.startswith("models:/"):
        return from_registry(source)
    path = Path(source)
    if path.is_file():
        return from_official(path, class_labels_csv, trusted)
    if (path / STUDENT_FILE).is_file():
        return from_checkpoint(path)
    if checkpoint_root(path).is_dir():
        return from_run(path)
    raise CheckpointError(
        f"{source}: not a models:/ URI, an official .pt file, a checkpoint folder (with {STUDENT_FILE}) or a run "
        "folder (with checkpoints/)"
    )


def write_export(exportable: Exportable, out: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` to `out` (which must not exist or be empty)."""
    from jobs.train.checkpointing import sha256_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; refusing to overwrite it")
    weights = exportable.weights
    if exportable.classes is not None and weights.head is not None:
        count = int(weights.head["head.weight"].shape[0])
        if len(exportable.classes) != count:
            raise ValueError(f"{len(exportable.classes)} class names for a head of {count} classes")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    encoder_only = ImportedCheckpoint(
        config=weights.config, kind="finetune" if weights.head is not None else "encoder",
        student_encoder=weights.student_encoder, head=weights.head, num_updates=weights.num_updates,
    )
    save_weights(encoder_only, staging / WEIGHTS_FILE)
    spec = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "model": dataclasses.asdict(weights.config),
        "audio": dataclasses.asdict(exportable.audio),
        "classes": exportable.classes if weights.head is not None else None,
        "pooling": exportable.pooling,
        "source": exportable.source,
        "weights_sha256": sha256_file(staging / WEIGHTS_FILE),
    }
    (staging / CONFIG_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
    publish_folder(staging, out)  # `out` is absent or empty (checked above)
    log.info("exported %s to %s", exportable.source, out)
    return out


def main(argv: list[str] | None = None) -> int:
    from mlflow.exceptions import MlflowException

    from jobs.mlops.registration import RegistrationRefused

    parser = argparse.ArgumentParser(
        prog="sslam export", description="export an encoder as config.json + model.safetensors"
    )
    parser.add_argument(
        "source", help="models:/NAME@ALIAS | models:/NAME/VERSION | RUN_DIR | CHECKPOINT_DIR | official .pt"
    )
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    parser.add_argument("--class-labels", help="class_labels_indices.csv naming an official fine-tuned head's classes")
    parser.add_argument("--trusted", action="store_true",
                        help="unpickle an official .pt without the allow-list (only for a file you trust)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = write_export(resolve_source(args.source, args.class_labels, args.trusted), args.out)
    except (CheckpointError, OSError, MlflowException, RegistrationRefused, ValueError) as error:
        print(f"sslam export: {error}", file=sys.stderr)
        return 1
    spec = json.loads((out / CONFIG_FILE).read_text())
    print(f"exported {spec['source']} to {out} ({spec['model']['embed_dim']}-d encoder, "
          f"{'a head of ' + str(len(spec['classes'])) + ' classes' if spec['classes'] else 'no head'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
