"""The MLflow model registry: student encoders exported as "model from code" pyfuncs, versions, tags, aliases.

A registration has two halves, so that a failure of MLflow never loses a checkpoint's model:

1. `export_checkpoint` (local disk only): consolidate the ZeRO checkpoint to fp32 with DeepSpeed's own utility
   (`jobs.checkpointing.consolidated_student`), take the student encoder, and save an MLflow pyfunc model folder
   (`mlflow.pyfunc.save_model` with `python_model="jobs/pyfunc_model.py"`, artifacts `encoder.safetensors` +
   `model_config.json`, `code_paths` = the `pipeline` and `model` packages, a signature and an input example; see
   jobs/pyfunc_model.py for the input and output format). The folder and a `pending_registration.json` go to
   `<output_dir>/registrations/update_XXXXXXXX/`, outside the checkpoint folders that keep-last-M pruning removes.
2. `complete_registration` (MLflow): create a logged model in the run's experiment, upload the folder, create a
   version of the registered model with tags (run_id, update, stage, encoder, dataset_fingerprint, source), move
   alias `candidate` to it (unless a newer checkpoint of the same run holds it), then replace the pending file by
   `registration.json` and delete the uploaded copy. Progress is saved after each step, so a retry continues.
   One process at a time completes a folder (an flock on its `.claim` file); another one skips it meanwhile.

`register_pending(run_dir)` retries whatever is still pending (the tracker at every checkpoint and at the end;
`sslam register RUN_DIR`). `register_official(path, name)` registers an official EAT / SSLAM checkpoint the same way,
with the class names of a fine-tuned one's head. MLflow reserves the alias `latest`; `models:/NAME/latest` already
means the newest version.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException

from jobs.tracking import ensure_experiment, mlflow_client, tracking_uri
from model.checkpoint import CheckpointError, ImportedCheckpoint, import_official, save_weights
from model.config import ModelConfig
from pipeline.config import AudioConfig

log = logging.getLogger("sslam.registry")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
CODE_PATHS = (PROJECT_ROOT / "pipeline", PROJECT_ROOT / "model")
REGISTRATIONS_DIR = "registrations"
PENDING_FILE = "pending_registration.json"
DONE_FILE = "registration.json"
CLAIM_FILE = ".claim"  # flock()ed while one process completes the registration
MODEL_DIR = "model"
WEIGHTS_FILE = "encoder.safetensors"
CONFIG_FILE = "model_config.json"
CANDIDATE = "candidate"
BEST = "best"
RESERVED_ALIASES = frozenset({"latest"})
# Input example: this long a test tone at the model's sample rate.
EXAMPLE_SECONDS = 0.5
EXAMPLE_HZ = 440.0
# The logged model's name inside its experiment.
LOGGED_MODEL_NAME = "encoder"


def encoder_name(cfg: ModelConfig) -> str:
    """Short architecture tag, "vit-{embed_dim}-{depth}", e.g. vit-768-12 for ViT-B."""
    return f"vit-{cfg.embed_dim}-{cfg.depth}"


# --------------------------------------------------------------------------------------- the pyfunc folder


def audio_config_for(model_cfg: ModelConfig, audio: AudioConfig | None = None) -> AudioConfig:
    """The front-end settings the model was trained with: `audio` (a run's data.audio) checked against the
    model's shapes, or the defaults with the model's target length and mel bins (imported checkpoints)."""
    if audio is None:
        return AudioConfig(target_length=model_cfg.target_length, mel_bins=model_cfg.mel_bins)
    if (audio.target_length, audio.mel_bins) != (model_cfg.target_length, model_cfg.mel_bins):
        raise ValueError(
            f"audio front-end ({audio.target_length} frames x {audio.mel_bins} bins) does not match the model "
            f"({model_cfg.target_length} x {model_cfg.mel_bins})"
        )
    return dataclasses.replace(audio)


def model_spec(
    model_cfg: ModelConfig, audio_cfg: AudioConfig, classes: list[dict] | None = None, pooling: str = "cls"
) -> dict:
    """The content of `model_config.json` (read by jobs/pyfunc_model.py)."""
    from jobs.pyfunc_model import CONFIG_FORMAT

    return {
        "format": CONFIG_FORMAT,
        "model": dataclasses.asdict(model_cfg),
        "audio": dataclasses.asdict(audio_cfg),
        "classes": classes,
        "pooling": pooling,
    }


def model_signature(model_cfg: ModelConfig, num_classes: int = 0):
    """Input: DataFrame columns `waveform` + `sample_rate` or `fbank` (all optional per row); output: tensors."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from jobs.pyfunc_model import DEFAULT_TOP_K

    inputs = Schema([
        ColSpec(Array("double"), "waveform", required=False),
        ColSpec("long", "sample_rate", required=False),
        ColSpec(Array(Array("double")), "fbank", required=False),
    ])
    dim, tokens = model_cfg.embed_dim, model_cfg.num_patches
    float32 = np.dtype(np.float32)
    specs = [TensorSpec(float32, (-1, dim), "utterance"), TensorSpec(float32, (-1, tokens, dim), "frames")]
    params = [ParamSpec("pooling", "string", "cls")]
    if num_classes:
        specs += [
            TensorSpec(float32, (-1, num_classes), "logits"),
            TensorSpec(float32, (-1, num_classes), "scores"),
            TensorSpec(np.dtype(np.int64), (-1, -1), "top_indices"),
            TensorSpec(float32, (-1, -1), "top_scores"),
            TensorSpec(np.dtype(object), (-1, -1), "top_labels"),
        ]
        params.append(ParamSpec("top_k", "long", DEFAULT_TOP_K))
    return ModelSignature(inputs=inputs, outputs=Schema(specs), params=ParamSchema(params))


def input_example(audio_cfg: AudioConfig):
    """One waveform row: a quiet test tone at the model's sample rate."""
    import pandas as pd

    t = np.arange(int(EXAMPLE_SECONDS * audio_cfg.sample_rate)) / audio_cfg.sample_rate
    tone = (0.1 * np.sin(2 * np.pi * EXAMPLE_HZ * t)).astype(np.float32)
    return pd.DataFrame({"waveform": [tone.tolist()], "sample_rate": [audio_cfg.sample_rate]})


def pip_requirements() -> list[str]:
    """Pinned to this environment (spares MLflow its slow requirement inference)."""
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for package in ("mlflow", "torch", "torchaudio", "numpy", "pandas", "safetensors", "soundfile"):
        try:
            requirements.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements


def save_pyfunc(
    weights: ImportedCheckpoint,
    path: str | Path,
    audio_cfg: AudioConfig | None = None,
    classes: list[dict] | None = None,
    pooling: str = "cls",
) -> Path:
    """Write an MLflow pyfunc model folder at `path` (must not exist or be empty) from encoder (+ head) weights."""
    import mlflow

    from jobs.pyfunc_model import MODEL_CONFIG

    path = Path(path)
    if weights.head is not None:
        num_classes = int(weights.head["head.weight"].shape[0])
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names for a head of {num_classes} classes")
    else:
        num_classes, classes = 0, None
    audio_cfg = audio_config_for(weights.config, audio_cfg)
    staging = path.with_name(path.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        encoder_only = ImportedCheckpoint(
            config=weights.config,
            kind="finetune" if weights.head is not None else "encoder",
            student_encoder=weights.student_encoder,
            head=weights.head,
            num_updates=weights.num_updates,
        )
        save_weights(encoder_only, staging / WEIGHTS_FILE)
        spec = model_spec(weights.config, audio_cfg, classes, pooling)
        (staging / CONFIG_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(PYFUNC_FILE),
            artifacts={"weights": str(staging / WEIGHTS_FILE), "config": str(staging / CONFIG_FILE)},
            code_paths=[str(p) for p in CODE_PATHS],
            signature=model_signature(weights.config, num_classes),
            input_example=input_example(audio_cfg),
            pip_requirements=pip_requirements(),
            model_config=dict(MODEL_CONFIG),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for cache in path.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------ pending registrations


@dataclass
class Registration:
    """What `pending_registration.json` / `registration.json` hold; the MLflow ids fill in as steps succeed."""

    model_name: str
    experiment: str
    tags: dict[str, str]
    aliases: list[str] = field(default_factory=lambda: [CANDIDATE])
    tracking_uri: str | None = None
    run_id: str | None = None
    updates: int | None = None
    model_id: str | None = None
    uploaded: bool = False
    version: str | None = None
    attempts: int = 0
    last_error: str = ""

    def save(self, folder: Path, name: str = PENDING_FILE) -> None:
        partial = folder / (name + ".partial")
        partial.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))
        os.replace(partial, folder / name)

    @classmethod
    def load(cls, path: Path) -> Registration:
        values = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}")
        return cls(**values)


def registrations_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / REGISTRATIONS_DIR


def pending_folders(run_dir: str | Path) -> list[Path]:
    """Folders of the run's pending registrations, oldest checkpoint first."""
    root = registrations_dir(run_dir)
    return sorted(path.parent for path in root.glob(f"*/{PENDING_FILE}")) if root.is_dir() else []


def _check_aliases(aliases: list[str]) -> None:
    reserved = sorted(set(aliases) & RESERVED_ALIASES)
    if reserved:
        raise ValueError(f"MLflow reserves the alias(es) {reserved}; models:/NAME/latest is the newest version")


def _stage_folder(folder: Path, weights: ImportedCheckpoint, registration: Registration, **pyfunc: Any) -> Path:
    """Save the pyfunc folder and the pending file into `folder` (replacing an unfinished earlier attempt)."""
    _check_aliases(registration.aliases)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / MODEL_DIR, ignore_errors=True)
    save_pyfunc(weights, folder / MODEL_DIR, **pyfunc)
    registration.save(folder)
    return folder


def _checkpoint_config(tag_dir: Path, fallback):
    from jobs.config import load_config

    saved = tag_dir / "config.yaml"
    if saved.is_file():
        return load_config(str(saved))
    if fallback is None:
        raise FileNotFoundError(f"{saved} is missing and no config was given")
    return fallback


def _dataset_fingerprint(config) -> str:
    if config.train.dataset_fingerprint:
        return config.train.dataset_fingerprint
    try:
        from pipeline.loader import read_dataset_info

        return str(read_dataset_info(config.data.loader.shards).get("fingerprint", ""))
    except (OSError, ValueError):
        return ""


def student_encoder_weights(tag_dir: str | Path, model_cfg: ModelConfig) -> ImportedCheckpoint:
    """The student encoder of a DeepSpeed checkpoint folder, fp32, via DeepSpeed's consolidation utility."""
    from jobs.checkpointing import consolidated_student
    from model.encoder import Encoder

    tag_dir = Path(tag_dir)
    student = consolidated_student(tag_dir.parent, tag_dir.name)
    prefix = "encoder."
    encoder = {key[len(prefix) :]: value for key, value in student.items() if key.startswith(prefix)}
    if "pos_embed" not in encoder:  # a buffer: consolidation may leave it out; it is the fixed sin-cos table
        encoder["pos_embed"] = Encoder(model_cfg).pos_embed
    return ImportedCheckpoint(config=model_cfg, kind="encoder", student_encoder=encoder)


def export_checkpoint(
    tag_dir: str | Path,
    updates: int,
    run_dir: str | Path | None = None,
    *,
    model_name: str | None = None,
    experiment: str | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    dataset_fingerprint: str | None = None,
    config=None,
    aliases: list[str] | None = None,
) -> Path:
    """Consolidate checkpoint `tag_dir` and stage its student encoder as a pending registration (no MLflow call).

    Returns the registration folder `<run_dir>/registrations/<tag>/` (run_dir defaults to the folder holding
    `checkpoints/`). Names default to the checkpoint's own config (`tracking.model_name`, `tracking.experiment`).
    """
    tag_dir = Path(tag_dir)
    run_dir = Path(run_dir) if run_dir is not None else tag_dir.parent.parent
    folder = registrations_dir(run_dir) / tag_dir.name
    if (folder / DONE_FILE).is_file() or (folder / PENDING_FILE).is_file():
        return folder
    config = _checkpoint_config(tag_dir, config)
    weights = student_encoder_weights(tag_dir, config.model)
    weights.num_updates = int(updates)
    if dataset_fingerprint is None:
        dataset_fingerprint = _dataset_fingerprint(config)
    registration = Registration(
        model_name=model_name or config.tracking.model_name,
        experiment=experiment or config.tracking.experiment,
        tags={
            "run_id": run_id or "",
            "update": str(int(updates)),
            "stage": str(config.model.stage),
            "encoder": encoder_name(config.model),
            "dataset_fingerprint": dataset_fingerprint,
            "source": "pretrain",
            "checkpoint": str(tag_dir.resolve()),
        },
        aliases=list(aliases) if aliases is not None else [CANDIDATE],
        tracking_uri=tracking_uri,
        run_id=run_id,
        updates=int(updates),
    )
    _stage_folder(folder, weights, registration, audio_cfg=config.data.audio)
    log.info("exported the student encoder of %s to %s (pending registration)", tag_dir, folder)
    return folder


# ------------------------------------------------------------------------------------------------ MLflow


def _version_update(version) -> int:
    try:
        return int(version.tags.get("update", -1))
    except (TypeError, ValueError):
        return -1


def _move_candidate(client, name: str, version, registration: Registration) -> bool:
    """Point `candidate` at `version` unless a newer checkpoint of the same run holds it already."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, CANDIDATE)
    except MlflowException:
        holder = None
    if (
        holder is not None
        and registration.run_id
        and holder.run_id == registration.run_id
        and registration.updates is not None
        and _version_update(holder) > registration.updates
    ):
        log.info("alias %s stays on version %s (a newer checkpoint of this run)", CANDIDATE, holder.version)
        return False
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return True


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if getattr(error, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="SSLAM audio encoders (jobs.registry)")
        except MlflowException as again:
            if getattr(again, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise


class RegistrationBusy(RuntimeError):
    """Another process (a training run's tracker, `sslam register`) is completing this registration now."""


@contextmanager
def _claimed(folder: Path):
    """Hold the folder's claim for the duration: one process at a time completes a registration."""
    with open(folder / CLAIM_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RegistrationBusy(f"{folder} is being registered by another process") from None
        yield  # closing the file releases the lock


def _client_for(registration: Registration, client):
    if client is not None:
        return client
    return mlflow_client(os.environ.get("MLFLOW_TRACKING_URI") or registration.tracking_uri or tracking_uri())


def complete_registration(folder: str | Path, client=None, run_id: str | None = None):
    """Upload and register a staged folder (steps already done are skipped); returns the ModelVersion.
    Raises RegistrationBusy while another process completes it, and any other failure with the progress saved
    in the pending file. A folder another process completed meanwhile returns its version."""
    folder = Path(folder)
    with _claimed(folder):
        if not (folder / PENDING_FILE).is_file():
            done = Registration.load(folder / DONE_FILE)
            return _client_for(done, client).get_model_version(done.model_name, done.version)
        return _complete_claimed(folder, client, run_id)


def _complete_claimed(folder: Path, client, run_id: str | None):
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    registration = Registration.load(folder / PENDING_FILE)
    client = _client_for(registration, client)
    if registration.run_id is None and run_id is not None:
        registration.run_id = run_id
        registration.tags["run_id"] = run_id
    registration.attempts += 1
    try:
        if registration.model_id is None:
            if registration.run_id:
                experiment_id = client.get_run(registration.run_id).info.experiment_id
            else:
                experiment_id = ensure_experiment(client, registration.experiment)
            logged = client.create_logged_model(
                experiment_id,
                name=LOGGED_MODEL_NAME,
                source_run_id=registration.run_id,
                tags={"registered_model": registration.model_name, **registration.tags},
            )
            registration.model_id = logged.model_id
            registration.save(folder)
        if not registration.uploaded:
            logged = client.get_logged_model(registration.model_id)
            model_dir = folder / MODEL_DIR
            meta = Model.load(str(model_dir))
            meta.model_id = logged.model_id
            meta.artifact_path = logged.artifact_location
            meta.run_id = registration.run_id
            meta.save(str(model_dir / "MLmodel"))
            client.log_model_artifacts(registration.model_id, str(model_dir))
            client.finalize_logged_model(registration.model_id, "READY")
            if registration.run_id:
                client.log_outputs(
                    registration.run_id, [LoggedModelOutput(registration.model_id, step=registration.updates or 0)]
                )
            registration.uploaded = True
            registration.save(folder)
        if registration.version is None:
            _ensure_registered_model(client, registration.model_name)
            version = client.create_model_version(
                registration.model_name,
                source=f"models:/{registration.model_id}",
                run_id=registration.run_id,
                tags=registration.tags,
                model_id=registration.model_id,
            )
            registration.version = str(version.version)
            registration.save(folder)
        version = client.get_model_version(registration.model_name, registration.version)
        for alias in registration.aliases:
            if alias == CANDIDATE:
                _move_candidate(client, registration.model_name, version, registration)
            else:
                client.set_registered_model_alias(registration.model_name, alias, version.version)
    except Exception as error:
        registration.last_error = f"{type(error).__name__}: {str(error).splitlines()[0][:500] if str(error) else ''}"
        registration.save(folder)
        raise
    registration.last_error = ""
    registration.save(folder, DONE_FILE)
    (folder / PENDING_FILE).unlink()
    shutil.rmtree(folder / MODEL_DIR, ignore_errors=True)
    log.info(
        "registered %s version %s (update %s, aliases %s)",
        registration.model_name, registration.version, registration.updates, registration.aliases,
    )
    return version


def register_pending(
    run_dir: str | Path, run_id: str | None = None, client=None, tracking_uri: str | None = None
) -> list:
    """Register every pending registration of a run folder, oldest first; returns the new ModelVersions.
    A failure is logged and leaves that registration pending (nothing is raised for MLflow errors)."""
    if client is None and tracking_uri is not None:
        client = mlflow_client(tracking_uri)
    versions = []
    for folder in pending_folders(run_dir):
        try:
            versions.append(complete_registration(folder, client=client, run_id=run_id))
        except RegistrationBusy as busy:
            log.info("%s; skipped here", busy)
        except Exception as error:  # noqa: BLE001 - reported, kept on disk, retried later
            log.warning(
                "registration of %s failed (%s: %s); it stays pending and is retried at the next checkpoint, at "
                "the end of training, or with `sslam register %s`",
                folder.name, type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "", run_dir,
            )
    return versions


def register_checkpoint(tag_dir: str | Path, updates: int | None = None, **export: Any):
    """Export and register one checkpoint folder now (no tracker needed); returns the ModelVersion."""
    tag_dir = Path(tag_dir)
    if updates is None:
        updates = int(tag_dir.name.rsplit("_", 1)[-1])
    folder = export_checkpoint(tag_dir, updates, **export)
    if (folder / DONE_FILE).is_file():
        done = Registration.load(folder / DONE_FILE)
        return mlflow_client(done.tracking_uri or tracking_uri()).get_model_version(done.model_name, done.version)
    return complete_registration(folder)


def register_official(
    checkpoint_path: str | Path,
    name: str,
    *,
    class_labels_csv: str | Path | None = None,
    experiment: str = "sslam",
    trusted: bool = False,
    overrides: dict[str, Any] | None = None,
    aliases: list[str] | None = None,
):
    """Register an official EAT / SSLAM checkpoint (model.checkpoint.import_official) as a version of `name`.

    A fine-tuned file keeps its classifier head; `class_labels_csv` (AudioSet's `class_labels_indices.csv`)
    names its classes, so predict also returns top labels. Returns the ModelVersion.
    """
    from pipeline.manifest import read_class_labels

    checkpoint_path = Path(checkpoint_path)
    weights = import_official(checkpoint_path, trusted=trusted, overrides=overrides)
    classes = None
    if weights.head is not None:
        num_classes = int(weights.head["head.weight"].shape[0])
        if class_labels_csv is not None:
            labels = read_class_labels(class_labels_csv)
            classes = [{"index": c.index, "mid": c.mid, "name": c.display_name} for c in labels]
        else:
            classes = [{"index": i, "mid": "", "name": f"class {i}"} for i in range(num_classes)]
    registration = Registration(
        model_name=name,
        experiment=experiment,
        tags={
            "update": str(weights.num_updates),
            "stage": "official",
            "encoder": encoder_name(weights.config),
            "dataset_fingerprint": "",
            "source": "official",
            "checkpoint": str(checkpoint_path.resolve()),
            "kind": weights.kind,
        },
        aliases=list(aliases) if aliases is not None else [CANDIDATE],
        updates=weights.num_updates,
    )
    with tempfile.TemporaryDirectory(prefix="sslam-official-") as staging:
        folder = _stage_folder(Path(staging) / "registration", weights, registration, classes=classes)
        return complete_registration(folder)


def resolve_version(model_uri: str, client=None):
    """The ModelVersion of `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/NAME/latest`; None for
    other URIs (runs:/..., paths)."""
    if not model_uri.startswith("models:/"):
        return None
    client = client or mlflow_client()
    reference = model_uri[len("models:/") :].rstrip("/")
    if "@" in reference:
        name, alias = reference.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = reference.rpartition("/")
    if not name:
        raise ValueError(f"{model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise ValueError(f"registered model {name!r} has no versions")
        return max(versions, key=lambda v: int(v.version))
    return client.get_model_version(name, version)


def main(argv: list[str] | None = None) -> int:
    """`sslam register RUN_DIR` | `--checkpoint TAG_DIR` | `--official FILE --name NAME [--class-labels CSV]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="sslam register", description="register encoders in the MLflow registry")
    parser.add_argument("run_dir", nargs="?", help="a training output folder: register its pending registrations")
    parser.add_argument("--checkpoint", help="a checkpoint folder (…/checkpoints/update_XXXXXXXX) to register now")
    parser.add_argument("--official", help="an official EAT / SSLAM checkpoint file (.pt) to register")
    parser.add_argument("--name", help="registered model name (--official; default: the checkpoint's config)")
    parser.add_argument("--class-labels", help="class_labels_indices.csv naming a fine-tuned head's classes")
    parser.add_argument("--experiment", default="sslam", help="experiment of the logged model (--official)")
    parser.add_argument("--trusted", action="store_true", help="unpickle an official file without the allow-list")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sum(x is not None for x in (args.run_dir, args.checkpoint, args.official)) != 1:
        parser.error("give exactly one of RUN_DIR, --checkpoint and --official")
    if args.official and not args.name:
        parser.error("--official needs --name")
    try:
        if args.official:
            version = register_official(args.official, args.name, class_labels_csv=args.class_labels,
                                        experiment=args.experiment, trusted=args.trusted)
        elif args.checkpoint:
            version = register_checkpoint(args.checkpoint, model_name=args.name)
        else:
            version = None
    except (CheckpointError, FileNotFoundError, MlflowException) as error:
        print(f"sslam register: {error}", file=sys.stderr)
        return 1
    if version is not None:
        print(f"registered {version.name} version {version.version}")
        return 0
    if not Path(args.run_dir).is_dir():
        parser.error(f"no run folder {args.run_dir}")
    versions = register_pending(args.run_dir)
    for version in versions:
        print(f"registered {version.name} version {version.version} (update {version.tags.get('update')})")
    left = pending_folders(args.run_dir)
    if left:
        print(f"{len(left)} registrations are still pending under {registrations_dir(args.run_dir)}", file=sys.stderr)
        return 1
    return 0
