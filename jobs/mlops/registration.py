"""Exporting a checkpoint for registration (local disk only): the signed pending registration folder.

`export_checkpoint` reads the checkpoint's full fp32 student from its `student.safetensors` (no pickle is opened;
only `trusted=True` / `--trusted` lets a folder without it go through DeepSpeed's consolidation,
`jobs.train.checkpointing.consolidated_student`, which unpickles), takes the student encoder (`encoder.` keys), and
saves its pyfunc model folder (jobs.mlops.pyfunc_package). The folder and a `pending_registration.json` go to
`<output_dir>/registrations/update_XXXXXXXX/`, outside the checkpoint folders that keep-last-M pruning removes. The
pending file (`Registration`) records the sha256 of the weights and a digest of every file of the folder (code and
MLmodel included, `folder_digest`), signed (HMAC-SHA256) with the exporting user's key (`registration_key`: outside
every run folder), so that jobs.mlops.registry can tell it from a folder planted or altered later.

A training job exports on `BackgroundExport`'s thread, one export at a time, so rank 0's training thread (and the
ranks waiting on it at the next collective) never waits for the reading, packaging and hashing of seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.train.checkpointing import sha256_file
from jobs.train.config import REFUSED_ALIASES
from jobs.mlops.pyfunc_package import WEIGHTS_ARTIFACT, save_pyfunc
from model.checkpoint import CheckpointError, ImportedCheckpoint
from model.config import ModelConfig
from pipeline.atomic import write_text

log = logging.getLogger("sslam.registry")

REGISTRATIONS_DIR = "registrations"
PENDING_FILE = "pending_registration.json"
DONE_FILE = "registration.json"
MODEL_DIR = "model"
KEY_ENV = "SSLAM_REGISTRATION_KEY_FILE"
KEY_BYTES = 32


def encoder_name(cfg: ModelConfig) -> str:
    """Short architecture tag, "vit-{embed_dim}-{depth}", e.g. vit-768-12 for ViT-B."""
    return f"vit-{cfg.embed_dim}-{cfg.depth}"



# ------------------------------------------------------------------------------------------------ integrity


class RegistrationRefused(ValueError):
    """A pending folder whose record does not verify (planted or altered after export), or a model whose files
    do not match the sha256 recorded on its version (tampered artifact)."""


def folder_digest(folder: str | Path, ignore: frozenset[str] = frozenset()) -> str:
    """sha256 over the sorted (relative path, sha256) of every file under `folder`: code, MLmodel and weights
    alike, so an added, removed or changed file changes it. Links are refused (they could point anywhere)."""
    folder = Path(folder)
    lines = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise RegistrationRefused(f"{path} is a symbolic link; a model folder holds plain files only")
        if path.is_file() and relative not in ignore:
            lines.append(f"{relative}\0{sha256_file(path)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def registration_key_path() -> Path:
    """The exporting user's signing key: $SSLAM_REGISTRATION_KEY_FILE, else ~/.config/sslam/registration.key."""
    configured = os.environ.get(KEY_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME", "").strip() or str(Path.home() / ".config")
    return Path(config_home) / "sslam" / "registration.key"


def registration_key() -> bytes:
    """The signing key, created (random, mode 0600) on first use; outside every run folder by design."""
    path = registration_key_path()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile
            pass
        else:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(os.urandom(KEY_BYTES))
            log.info("created the registration signing key %s", path)
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise RegistrationRefused(f"registration key {path} is shorter than {KEY_BYTES} bytes")
    return key


# ------------------------------------------------------------------------------------ pending registrations


@dataclass
class Registration:
    """What `pending_registration.json` / `registration.json` hold; the MLflow ids fill in as steps succeed."""

    model_name: str
    experiment: str
    tags: dict[str, str]
    aliases: list[str] = field(default_factory=list)
    tracking_uri: str | None = None
    run_id: str | None = None
    updates: int | None = None
    model_id: str | None = None
    uploaded: bool = False
    version: str | None = None
    attempts: int = 0
    last_error: str = ""
    weights_sha256: str = ""
    model_sha256: str = ""  # folder_digest of the exported model folder
    signature: str = ""  # HMAC of `signed()` with the exporting user's key (registration_key)
    uploaded_sha256: str = ""  # folder_digest of the folder as uploaded (MLmodel filled in): the version's tag

    def signed(self, folder_name: str) -> bytes:
        """What the signature covers: everything fixed at export (the MLflow ids and the run id fill in later)."""
        tags = {key: value for key, value in self.tags.items() if key != "run_id"}
        fixed = {
            "folder": folder_name, "model_name": self.model_name, "experiment": self.experiment, "tags": tags,
            "tracking_uri": self.tracking_uri, "aliases": self.aliases, "updates": self.updates,
            "weights_sha256": self.weights_sha256, "model_sha256": self.model_sha256,
        }
        return json.dumps(fixed, sort_keys=True).encode()

    def sign(self, folder_name: str) -> None:
        self.signature = hmac.new(registration_key(), self.signed(folder_name), hashlib.sha256).hexdigest()

    def verify(self, folder_name: str) -> None:
        """Raise RegistrationRefused unless the signature is the exporting key's over this record."""
        if not self.signature or not self.weights_sha256 or not self.model_sha256:
            raise RegistrationRefused("the pending registration carries no signed export record")
        expected = hmac.new(registration_key(), self.signed(folder_name), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, self.signature):
            raise RegistrationRefused(
                f"the export record's signature does not verify with {registration_key_path()} (planted, altered, or "
                "exported by another user or machine)"
            )

    def save(self, folder: Path, name: str = PENDING_FILE) -> None:
        write_text(folder / name, json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))

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
    refused = [f"{alias!r}: {REFUSED_ALIASES[alias.lower()]}" for alias in aliases if alias.lower() in REFUSED_ALIASES]
    if refused:
        raise ValueError(f"a registration may not move these aliases: {'; '.join(refused)}")


def _stage_folder(folder: Path, weights: ImportedCheckpoint, registration: Registration, **pyfunc: Any) -> Path:
    """Save the pyfunc folder and the signed pending file into `folder` (replacing an unfinished earlier
    attempt). The record holds the sha256 of the weights and the digest of the whole folder, signed with this
    user's key, so `complete_registration` can tell this folder from one planted or altered later."""
    _check_aliases(registration.aliases)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / MODEL_DIR, ignore_errors=True)
    save_pyfunc(weights, folder / MODEL_DIR, **pyfunc)
    registration.weights_sha256 = sha256_file(folder / MODEL_DIR / WEIGHTS_ARTIFACT)
    registration.model_sha256 = folder_digest(folder / MODEL_DIR)
    registration.sign(folder.name)
    registration.save(folder)
    return folder


def _checkpoint_config(tag_dir: Path, fallback):
    from jobs.train.config import load_config

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
        from pipeline.shardset import read_dataset_info

        return str(read_dataset_info(config.data.loader.shards).get("fingerprint", ""))
    except (OSError, ValueError):
        return ""


class BackgroundExport:
    """Exports of a training job on one thread, one at a time: `submit` returns at once (after waiting for the
    export still running, if any: a queue of one); `wait` joins it. A failed export is logged when it fails and
    kept in `failures` for the job to report at its end."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self.failures: list[str] = []

    def submit(self, what: str, export: Callable[[], object], then: Callable[[], None]) -> None:
        """Run `export()` on the export thread, then `then()` when it succeeded."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(what, export, then), name="sslam-export", daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Join the running export (at most `timeout_s`); True when none runs any more."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True

    def _run(self, what: str, export: Callable[[], object], then: Callable[[], None]) -> None:
        try:
            export()
        except Exception as error:  # noqa: BLE001 - an export never ends training; finish reports it
            log.exception("could not export %s for registration; training continues", what)
            self.failures.append(f"{what}: {type(error).__name__}: {error}")
            return
        then()


def student_encoder_weights(tag_dir: str | Path, model_cfg: ModelConfig, trusted: bool = False) -> ImportedCheckpoint:
    """The student encoder of a checkpoint folder, fp32: from its `student.safetensors` (the full fp32 student
    jobs.train.checkpointing writes beside DeepSpeed's files; reading it runs no code). Only with `trusted` does a
    folder without it fall back to DeepSpeed's consolidation, which unpickles the model / optimizer states."""
    from safetensors.torch import load_file

    from jobs.train.checkpointing import STUDENT_FILE, consolidated_student
    from model.encoder import Encoder

    tag_dir = Path(tag_dir)
    if (tag_dir / STUDENT_FILE).is_file():
        student = load_file(str(tag_dir / STUDENT_FILE))
    elif trusted:
        log.warning("%s has no %s: consolidating DeepSpeed's pickled states (--trusted)", tag_dir, STUDENT_FILE)
        student = consolidated_student(tag_dir.parent, tag_dir.name)
    else:
        raise CheckpointError(
            f"{tag_dir} has no {STUDENT_FILE}; reading DeepSpeed's model states instead unpickles them, which can run "
            "code: pass --trusted (trusted=True) only for a folder you trust"
        )
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
    trusted: bool = False,
) -> Path:
    """Stage the student encoder of checkpoint `tag_dir` as a signed pending registration (no MLflow call).

    Returns the registration folder `<run_dir>/registrations/<tag>/` (run_dir defaults to the folder holding
    `checkpoints/`). Names and aliases default to the checkpoint's own config (`tracking.model_name`,
    `tracking.experiment`, `tracking.aliases`). `trusted`: see `student_encoder_weights`.
    """
    tag_dir = Path(tag_dir)
    run_dir = Path(run_dir) if run_dir is not None else tag_dir.parent.parent
    folder = registrations_dir(run_dir) / tag_dir.name
    if (folder / DONE_FILE).is_file():
        return folder
    if (folder / PENDING_FILE).is_file():
        try:
            Registration.load(folder / PENDING_FILE).verify(folder.name)
            return folder
        except (RegistrationRefused, ValueError, TypeError) as error:  # a planted or broken one: exported anew
            log.warning("%s does not hold this user's export (%s); exporting %s again", folder, error, tag_dir)
    config = _checkpoint_config(tag_dir, config)
    weights = student_encoder_weights(tag_dir, config.model, trusted=trusted)
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
        aliases=list(aliases) if aliases is not None else list(config.tracking.aliases),
        tracking_uri=tracking_uri,
        run_id=run_id,
        updates=int(updates),
    )
    _stage_folder(folder, weights, registration, audio_cfg=config.data.audio)
    log.info("exported the student encoder of %s to %s (pending registration)", tag_dir, folder)
    return folder
