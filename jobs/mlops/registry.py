"""The MLflow model registry: student encoders exported as "model from code" pyfuncs, versions, tags, aliases.

A registration has two halves, so that a failure of MLflow never loses a checkpoint's model:

1. `export_checkpoint` (local disk only, jobs.mlops.registration): the checkpoint's student encoder saved as an
   MLflow pyfunc model folder (jobs.mlops.pyfunc_package; see jobs/mlops/pyfunc_model.py for the input and output
   format) beside a `pending_registration.json` signed with the exporting user's key, under
   `<output_dir>/registrations/update_XXXXXXXX/`.
2. `complete_registration` (MLflow, this module): check the folder against its signed record (a planted or
   altered folder is refused: RegistrationRefused, unless `trusted`), create a logged model in the run's
   experiment, upload a checked copy of the folder, create a version of the registered model with tags (run_id,
   update, stage, encoder, dataset_fingerprint, source, weights_sha256, model_sha256, and the registering process's
   lineage: mlflow.source.name / mlflow.user / mlflow.source.git.commit, jobs.mlops.lineage), list the version on
   the logged model (its `mlflow.modelVersions` tag, as `mlflow.register_model` does, so the UI shows it), move the
   aliases its record names to it (each unless a newer checkpoint of the same run holds it), then replace the
   pending file by `registration.json` and delete the uploaded copy. Progress is saved after each step, so a retry
   continues. One process at a time completes a folder (an flock on its `.claim` file); another one skips it
   meanwhile.

`register_pending(run_dir)` retries whatever is still pending (the tracker at every checkpoint and at the end;
`sslam register RUN_DIR`, jobs/register.py). `register_official(path, name)` registers an official EAT / SSLAM
checkpoint the same way, with the class names of a fine-tuned one's head.

The pyfunc's code is private (jobs.mlops.pyfunc_package) and part of the folder digest (`model_sha256`) like
everything else.

Aliases. A registration moves exactly the aliases it was exported with: a run's `tracking.aliases` (base presets
`[candidate]`, everything else none unless asked), `--alias` of `sslam register --checkpoint / --official` (a
checkpoint defaults to its run's config). Which checkpoints of a run are registered is `tracking.register`
(jobs.mlops.tracking). Refused everywhere: `latest` (MLflow's: `models:/NAME/latest` is the newest version) and `best`
(moved only by `sslam evaluate --promote`, which compares the metric with its holder's).

`load_verified(uri)` (sslam infer, sslam evaluate) checks a version's downloaded files against its
`weights_sha256` / `model_sha256` tags before any of its code runs.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.train.checkpointing import sha256_file
from jobs.mlops.client import ensure_experiment, mlflow_client, tracking_uri
from jobs.mlops.lineage import lineage_tags, link_version
from jobs.mlops.pyfunc_package import WEIGHTS_ARTIFACT
from jobs.mlops.registration import (
    DONE_FILE,
    MODEL_DIR,
    PENDING_FILE,
    Registration,
    RegistrationRefused,
    _stage_folder,
    encoder_name,
    export_checkpoint,
    folder_digest,
    pending_folders,
)
from model.official import import_official

log = logging.getLogger("sslam.registry")

CLAIM_FILE = ".claim"  # flock()ed while one process completes the registration
# Version tags: sha256 of the weights file and digest of every file of the uploaded model folder.
WEIGHTS_SHA_TAG = "weights_sha256"
MODEL_SHA_TAG = "model_sha256"
# Written by MLflow into a folder downloaded from models:/ URIs; not part of what was uploaded.
DOWNLOAD_EXTRAS = frozenset({"registered_model_meta"})
BEST = "best"
# The logged model's name inside its experiment.
LOGGED_MODEL_NAME = "encoder"


def _version_update(version) -> int:
    try:
        return int(version.tags.get("update", -1))
    except (TypeError, ValueError):
        return -1


def _move_alias(client, name: str, alias: str, version, registration: Registration) -> bool:
    """Point `alias` at `version` unless a newer checkpoint of the same run holds it already."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if (
        holder is not None
        and registration.run_id
        and holder.run_id == registration.run_id
        and registration.updates is not None
        and _version_update(holder) > registration.updates
    ):
        log.info("alias %s stays on version %s (a newer checkpoint of this run)", alias, holder.version)
        return False
    client.set_registered_model_alias(name, alias, version.version)
    return True


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if getattr(error, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="SSLAM audio encoders (jobs.mlops.registry)")
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


def complete_registration(folder: str | Path, client=None, run_id: str | None = None, trusted: bool = False):
    """Upload and register a staged folder (steps already done are skipped); returns the ModelVersion.

    The folder must match its signed export record (`Registration.verify`, `folder_digest`), else
    RegistrationRefused; `trusted` skips that check (a folder the caller vouches for). Raises RegistrationBusy
    while another process completes it, and any other failure with the progress saved in the pending file. A
    folder another process completed meanwhile returns its version."""
    folder = Path(folder)
    with _claimed(folder):
        if not (folder / PENDING_FILE).is_file():
            done = Registration.load(folder / DONE_FILE)
            return _client_for(done, client).get_model_version(done.model_name, done.version)
        return _complete_claimed(folder, client, run_id, trusted)


def _checked_copy(folder: Path, registration: Registration, destination: Path, trusted: bool) -> Path:
    """Copy the exported model folder to `destination` and check the copy (what is uploaded) against the
    record; a trusted folder without a record gets its weights' sha256 computed here."""
    shutil.copytree(folder / MODEL_DIR, destination, symlinks=True)
    weights = sha256_file(destination / WEIGHTS_ARTIFACT)
    if trusted and not registration.weights_sha256:
        registration.weights_sha256 = weights
    if trusted:
        return destination
    if weights != registration.weights_sha256 or folder_digest(destination) != registration.model_sha256:
        raise RegistrationRefused(
            f"{folder / MODEL_DIR} no longer matches its export record (weights sha256 {weights}, recorded "
            f"{registration.weights_sha256}): files were changed after export"
        )
    return destination


def _complete_claimed(folder: Path, client, run_id: str | None, trusted: bool):
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    registration = Registration.load(folder / PENDING_FILE)
    client = _client_for(registration, client)
    if registration.run_id is None and run_id is not None:
        registration.run_id = run_id
        registration.tags["run_id"] = run_id
    registration.attempts += 1
    try:
        if not trusted:
            registration.verify(folder.name)
        if registration.model_id is None:
            if registration.run_id:
                experiment_id = client.get_run(registration.run_id).info.experiment_id
            else:
                experiment_id = ensure_experiment(client, registration.experiment)
            logged = client.create_logged_model(
                experiment_id,
                name=LOGGED_MODEL_NAME,
                source_run_id=registration.run_id,
                tags={"registered_model": registration.model_name, **registration.tags, **lineage_tags()},
            )
            registration.model_id = logged.model_id
            registration.save(folder)
        if not registration.uploaded:
            logged = client.get_logged_model(registration.model_id)
            with tempfile.TemporaryDirectory(prefix="sslam-upload-") as upload:
                model_dir = _checked_copy(folder, registration, Path(upload) / MODEL_DIR, trusted)
                meta = Model.load(str(model_dir))
                meta.model_id = logged.model_id
                meta.artifact_path = logged.artifact_location
                meta.run_id = registration.run_id
                meta.save(str(model_dir / "MLmodel"))
                registration.uploaded_sha256 = folder_digest(model_dir)
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
                tags={
                    **registration.tags,
                    **lineage_tags(),
                    WEIGHTS_SHA_TAG: registration.weights_sha256,
                    MODEL_SHA_TAG: registration.uploaded_sha256,
                },
                model_id=registration.model_id,
            )
            registration.version = str(version.version)
            registration.save(folder)
        version = client.get_model_version(registration.model_name, registration.version)
        if version.tags.get(WEIGHTS_SHA_TAG) != registration.weights_sha256:
            raise RegistrationRefused(
                f"version {registration.version} of {registration.model_name} holds other weights than this "
                "registration; no alias moved"
            )
        link_version(client, registration.model_id, version.name, version.version)
        for alias in registration.aliases:
            _move_alias(client, registration.model_name, alias, version, registration)
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
    run_dir: str | Path,
    run_id: str | None = None,
    client=None,
    tracking_uri: str | None = None,
    trusted: bool = False,
) -> list:
    """Register every pending registration of a run folder, oldest first; returns the new ModelVersions.
    A failure is logged and leaves that registration pending (nothing is raised for MLflow errors); so is a
    folder that does not match its signed export record (unless `trusted`)."""
    if client is None and tracking_uri is not None:
        client = mlflow_client(tracking_uri)
    versions = []
    for folder in pending_folders(run_dir):
        try:
            versions.append(complete_registration(folder, client=client, run_id=run_id, trusted=trusted))
        except RegistrationBusy as busy:
            log.info("%s; skipped here", busy)
        except RegistrationRefused as refused:
            log.warning("registration of %s refused: %s; it stays pending, nothing was uploaded (register a "
                        "checkpoint with `sslam register --checkpoint`, or pass --trusted for a folder you vouch for)",
                        folder, refused)
        except Exception as error:  # noqa: BLE001 - reported, kept on disk, retried later
            log.warning(
                "registration of %s failed (%s: %s); it stays pending and is retried at the next checkpoint, at "
                "the end of training, or with `sslam register %s`",
                folder.name, type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "", run_dir,
            )
    return versions


def register_checkpoint(tag_dir: str | Path, updates: int | None = None, **export: Any):
    """Export and register one checkpoint folder now (no tracker needed); returns the ModelVersion.
    `trusted=True` lets a folder without student.safetensors be read through DeepSpeed's pickles."""
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
    """Register an official EAT / SSLAM checkpoint (model.official.import_official) as a version of `name`.

    A fine-tuned file keeps its classifier head; `class_labels_csv` (AudioSet's `class_labels_indices.csv`)
    names its classes, so predict also returns top labels. The version moves `aliases` only (none by default).
    Returns the ModelVersion.
    """
    from pipeline.csv_rows import read_class_labels

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
        aliases=list(aliases or []),
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


def load_verified(model_uri: str, client=None, model_config: dict | None = None):
    """(ModelVersion or None, exact URI, loaded pyfunc): a registry URI's files are downloaded and checked
    against the version's `weights_sha256` / `model_sha256` tags BEFORE any of its code runs, then loaded from
    that checked copy; RegistrationRefused when they differ or the version has no such tags. Other URIs (a
    path, runs:/...) are loaded as they are: only the pyfunc's own weights check applies."""
    import mlflow

    version = resolve_version(model_uri, client)
    if version is None:
        log.warning("%s is not a registry URI: its files are not checked against a registered sha256", model_uri)
        return None, model_uri, mlflow.pyfunc.load_model(model_uri, model_config=model_config)
    exact = f"models:/{version.name}/{version.version}"
    expected = {tag: version.tags.get(tag, "") for tag in (WEIGHTS_SHA_TAG, MODEL_SHA_TAG)}
    if not all(expected.values()):
        raise RegistrationRefused(
            f"{exact} records no {WEIGHTS_SHA_TAG}/{MODEL_SHA_TAG} tag (registered before they existed): register it "
            "again to use it"
        )
    local = Path(tempfile.mkdtemp(prefix="sslam-model-"))
    atexit.register(shutil.rmtree, local, True)  # the loaded code_paths are imported from here
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=exact, dst_path=str(local)))
    weights = sha256_file(path / WEIGHTS_ARTIFACT) if (path / WEIGHTS_ARTIFACT).is_file() else "missing"
    if weights != expected[WEIGHTS_SHA_TAG]:
        raise RegistrationRefused(
            f"{exact}: the weights' sha256 {weights} is not the registered {expected[WEIGHTS_SHA_TAG]}: the artifact "
            "was altered; refusing to load it"
        )
    if folder_digest(path, ignore=DOWNLOAD_EXTRAS) != expected[MODEL_SHA_TAG]:
        raise RegistrationRefused(
            f"{exact}: the model's files (code, MLmodel, config) differ from those registered: the artifact was "
            "altered; refusing to load it"
        )
    return version, exact, mlflow.pyfunc.load_model(str(path), model_config=model_config)
