"""The MLflow model registry: student encoders exported as "model from code" pyfuncs, versions, tags, aliases.

A registration has two halves, so that a failure of MLflow never loses a checkpoint's model:

1. `export_checkpoint` (local disk only): read the checkpoint's full fp32 student from its `student.safetensors`
   (no pickle is opened; only `trusted=True` / `--trusted` lets a folder without it go through DeepSpeed's
   consolidation, `jobs.train.checkpointing.consolidated_student`, which unpickles), take the student encoder
   (`encoder.` keys), and save an MLflow pyfunc model folder
   (`mlflow.pyfunc.save_model` with `python_model` = jobs/mlops/pyfunc_model.py, artifacts `encoder.safetensors` +
   `model_config.json`, the project code it needs as a private package, a signature and an input example; see
   jobs/mlops/pyfunc_model.py for the input and output format). The folder and a `pending_registration.json` go to
   `<output_dir>/registrations/update_XXXXXXXX/`, outside the checkpoint folders that keep-last-M pruning removes.
   The pending file records the sha256 of the weights and a digest of every file of the folder (code and MLmodel
   included), signed (HMAC-SHA256) with the exporting user's key (`registration_key`: outside every run folder).
2. `complete_registration` (MLflow): check the folder against its signed record (a planted or altered folder is
   refused: RegistrationRefused, unless `trusted`), create a logged model in the run's experiment, upload a
   checked copy of the folder, create a version of the registered model with tags (run_id, update, stage,
   encoder, dataset_fingerprint, source, weights_sha256, model_sha256, and the registering process's lineage:
   mlflow.source.name / mlflow.user / mlflow.source.git.commit, jobs.mlops.lineage), list the version on the logged model
   (its `mlflow.modelVersions` tag, as `mlflow.register_model` does, so the UI shows it), move the aliases its
   record names to it (each unless a newer checkpoint of the same run holds it), then replace the pending file by
   `registration.json` and delete the uploaded copy. Progress is saved after each step, so a retry continues.
   One process at a time completes a folder (an flock on its `.claim` file); another one skips it meanwhile.

`register_pending(run_dir)` retries whatever is still pending (the tracker at every checkpoint and at the end;
`sslam register RUN_DIR`). `register_official(path, name)` registers an official EAT / SSLAM checkpoint the same way,
with the class names of a fine-tuned one's head.

The pyfunc's code is private. The modules of `model/` and `pipeline/` that jobs/mlops/pyfunc_model.py imports
(transitively, function bodies included) are copied into `code/_sslam_pyfunc_<digest>/` of the model folder with
every `from model...` / `from pipeline...` rewritten to that package, and the shipped pyfunc_model.py imports from
it. So a registered model loads in an application that has its own top-level `model`, `pipeline` or `config`
modules, leaves those alone, and two versions built from different code loaded in one process each run their own
(the digest names the code). The code is part of the folder digest (`model_sha256`) like everything else.

Aliases. A registration moves exactly the aliases it was exported with: a run's `tracking.aliases` (base presets
`[candidate]`, everything else none unless asked), `--alias` of `sslam register --checkpoint / --official` (a
checkpoint defaults to its run's config). Which checkpoints of a run are registered is `tracking.register`
(jobs.mlops.tracking). Refused everywhere: `latest` (MLflow's: `models:/NAME/latest` is the newest version) and `best`
(moved only by `sslam evaluate --promote`, which compares the metric with its holder's).

`load_verified(uri)` (sslam infer, sslam evaluate) checks a version's downloaded files against its
`weights_sha256` / `model_sha256` tags before any of its code runs.
"""

from __future__ import annotations

import ast
import atexit
import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException

from jobs.train.checkpointing import sha256_file
from jobs.train.config import REFUSED_ALIASES
from jobs.mlops.lineage import lineage_tags, link_version
from jobs.mlops.tracking import ensure_experiment, mlflow_client, tracking_uri
from model.checkpoint import CheckpointError, ImportedCheckpoint, save_weights
from model.config import ModelConfig
from model.official import import_official
from pipeline.config import AudioConfig

log = logging.getLogger("sslam.registry")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# The project packages the pyfunc's code may import; they ship inside the model under a private package name.
SHIPPED_PACKAGES = ("model", "pipeline")
PRIVATE_PACKAGE_PREFIX = "_sslam_pyfunc_"
CODE_DIR = "code"  # where save_model puts code_paths inside a model folder
REGISTRATIONS_DIR = "registrations"
PENDING_FILE = "pending_registration.json"
DONE_FILE = "registration.json"
CLAIM_FILE = ".claim"  # flock()ed while one process completes the registration
MODEL_DIR = "model"
WEIGHTS_FILE = "encoder.safetensors"
CONFIG_FILE = "model_config.json"
WEIGHTS_ARTIFACT = f"artifacts/{WEIGHTS_FILE}"  # where save_model puts the weights inside a model folder
# Version tags: sha256 of the weights file and digest of every file of the uploaded model folder.
WEIGHTS_SHA_TAG = "weights_sha256"
MODEL_SHA_TAG = "model_sha256"
# Written by MLflow into a folder downloaded from models:/ URIs; not part of what was uploaded.
DOWNLOAD_EXTRAS = frozenset({"registered_model_meta"})
KEY_ENV = "SSLAM_REGISTRATION_KEY_FILE"
KEY_BYTES = 32
BEST = "best"
# Input example: this long a test tone at the model's sample rate.
EXAMPLE_SECONDS = 0.5
EXAMPLE_HZ = 440.0
# The logged model's name inside its experiment.
LOGGED_MODEL_NAME = "encoder"


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
    model_cfg: ModelConfig,
    audio_cfg: AudioConfig,
    classes: list[dict] | None = None,
    pooling: str = "cls",
    weights_sha256: str = "",
) -> dict:
    """The content of `model_config.json` (read by jobs/mlops/pyfunc_model.py, which checks the weights' sha256)."""
    from jobs.mlops.pyfunc_model import CONFIG_FORMAT

    return {
        "format": CONFIG_FORMAT,
        "model": dataclasses.asdict(model_cfg),
        "audio": dataclasses.asdict(audio_cfg),
        "classes": classes,
        "pooling": pooling,
        "weights_sha256": weights_sha256,
    }


def model_signature(model_cfg: ModelConfig, num_classes: int = 0):
    """Input: DataFrame columns `waveform` + `sample_rate` or `fbank` (all optional per row); output: tensors."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from jobs.mlops.pyfunc_model import DEFAULT_TOP_K

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


def _project_imports(path: Path) -> list[ast.ImportFrom]:
    """The `from model... import` / `from pipeline... import` statements of a source file, function bodies
    included. Any other way of reaching project code (`import model.x`, relative imports, `jobs`) is refused:
    the private copy could not honour it."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name for alias in node.names if alias.name.split(".")[0] in (*SHIPPED_PACKAGES, "jobs")]
            if roots:
                raise ValueError(f"{path}:{node.lineno}: `import {roots[0]}`: code shipped with the registered model "
                                 "imports project modules as `from PACKAGE.MODULE import NAME` only")
        elif isinstance(node, ast.ImportFrom):
            root = (node.module or "").split(".")[0]
            if node.level:
                raise ValueError(f"{path}:{node.lineno}: relative import: code shipped with the registered model uses "
                                 "absolute `from PACKAGE.MODULE import NAME` imports")
            if root == "jobs":
                raise ValueError(f"{path}:{node.lineno}: imports {node.module}, which the registered model does not "
                                 f"ship (only {', '.join(SHIPPED_PACKAGES)})")
            if root in SHIPPED_PACKAGES:
                found.append(node)
    return found


def _module_source(name: str) -> Path | None:
    """The source file of project module `name` (a package's `__init__.py`), None when there is none."""
    base = PROJECT_ROOT.joinpath(*name.split("."))
    source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return source if source.is_file() else None


def shipped_modules(entry: Path) -> dict[str, Path]:
    """Module name -> source of every project module `entry` needs, transitively (with each package's
    `__init__.py`, and submodules named by `from PACKAGE import MODULE`)."""
    needed: dict[str, Path] = {}
    queue = [entry]
    while queue:
        for node in _project_imports(queue.pop()):
            parts = node.module.split(".")
            names = [".".join(parts[: depth + 1]) for depth in range(len(parts))]
            names += [f"{node.module}.{alias.name}" for alias in node.names
                      if _module_source(f"{node.module}.{alias.name}") is not None]
            for name in names:
                if name in needed:
                    continue
                source = _module_source(name)
                if source is None:
                    raise ValueError(f"{entry} needs {name}, which is not a module under {PROJECT_ROOT}")
                needed[name] = source
                queue.append(source)
    return needed


def _privatized(path: Path, package: str) -> str:
    """The text of `path` with each `from model...` / `from pipeline...` reading `from <package>.model...`."""
    lines = path.read_text().splitlines(keepends=True)
    for node in sorted(_project_imports(path), key=lambda n: (n.lineno, n.col_offset), reverse=True):
        line = lines[node.lineno - 1]
        match = re.compile(rf"from\s+{re.escape(node.module)}(?![\w.])").match(line, node.col_offset)
        if match is None:
            raise ValueError(f"{path}:{node.lineno}: cannot rewrite the import of {node.module} in {line.strip()!r}")
        lines[node.lineno - 1] = f"{line[: node.col_offset]}from {package}.{node.module}{line[match.end():]}"
    return "".join(lines)


def write_private_code(staging: Path) -> tuple[Path, Path]:
    """Write the pyfunc file and its private package (module docstring) into `staging`; returns (the pyfunc
    file, the package folder). The package's name is a digest of the code it holds."""
    modules = shipped_modules(PYFUNC_FILE)
    digest = hashlib.sha256()
    for name, source in sorted({**modules, "": PYFUNC_FILE}.items()):
        digest.update(f"{name}\0{sha256_file(source)}\n".encode())
    package = PRIVATE_PACKAGE_PREFIX + digest.hexdigest()[:16]
    root = staging / CODE_DIR / package
    root.mkdir(parents=True)
    (root / "__init__.py").write_text(
        f'"""This registered model\'s private copy of the project code it runs ({", ".join(SHIPPED_PACKAGES)}).'
        '"""\n'
    )
    for name, source in modules.items():
        target = root.joinpath(*name.split("."))
        target = target / "__init__.py" if source.name == "__init__.py" else target.with_suffix(".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_privatized(source, package))
    pyfunc = staging / PYFUNC_FILE.name
    pyfunc.write_text(_privatized(PYFUNC_FILE, package))
    return pyfunc, root


@contextmanager
def _importable(package_dir: Path):
    """Let this process import the private package from `package_dir` (save_model runs the pyfunc file once),
    then forget the modules imported from there: a later load imports them from the model folder."""
    sys.path.insert(0, str(package_dir.parent))
    try:
        yield
    finally:
        sys.path.remove(str(package_dir.parent))
        name = package_dir.name
        for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            origin = getattr(sys.modules[module], "__file__", None) or ""
            if Path(origin).resolve().is_relative_to(package_dir.resolve()):
                del sys.modules[module]


def save_pyfunc(
    weights: ImportedCheckpoint,
    path: str | Path,
    audio_cfg: AudioConfig | None = None,
    classes: list[dict] | None = None,
    pooling: str = "cls",
) -> Path:
    """Write an MLflow pyfunc model folder at `path` (must not exist or be empty) from encoder (+ head) weights."""
    import mlflow

    from jobs.mlops.pyfunc_model import MODEL_CONFIG

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
        spec = model_spec(weights.config, audio_cfg, classes, pooling, sha256_file(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
        pyfunc, package_dir = write_private_code(staging)
        with _importable(package_dir):
            mlflow.pyfunc.save_model(
                path=str(path),
                python_model=str(pyfunc),
                artifacts={"weights": str(staging / WEIGHTS_FILE), "config": str(staging / CONFIG_FILE)},
                code_paths=[str(package_dir)],
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
        from pipeline.loader import read_dataset_info

        return str(read_dataset_info(config.data.loader.shards).get("fingerprint", ""))
    except (OSError, ValueError):
        return ""


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


# ------------------------------------------------------------------------------------------------ MLflow


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
    parser.add_argument(
        "--alias", dest="aliases", action="append", default=None, metavar="ALIAS",
        help="alias to move to the new version (repeatable; --checkpoint: default its run's tracking.aliases, "
        "--official: default none); 'latest' and 'best' are refused",
    )
    parser.add_argument(
        "--trusted", action="store_true",
        help="you vouch for the input: unpickle an official file without the allow-list; read a checkpoint without "
        "student.safetensors through DeepSpeed's pickles; complete RUN_DIR's pending folders without their signed "
        "export record",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sum(x is not None for x in (args.run_dir, args.checkpoint, args.official)) != 1:
        parser.error("give exactly one of RUN_DIR, --checkpoint and --official")
    if args.official and not args.name:
        parser.error("--official needs --name")
    if args.run_dir and args.aliases is not None:
        parser.error("--alias goes with --checkpoint or --official (a pending registration keeps its own aliases)")
    try:
        if args.official:
            version = register_official(args.official, args.name, class_labels_csv=args.class_labels,
                                        experiment=args.experiment, trusted=args.trusted, aliases=args.aliases)
        elif args.checkpoint:
            version = register_checkpoint(args.checkpoint, model_name=args.name, trusted=args.trusted,
                                          aliases=args.aliases)
        else:
            version = None
    except (CheckpointError, FileNotFoundError, MlflowException, ValueError) as error:  # RegistrationRefused too
        print(f"sslam register: {error}", file=sys.stderr)
        return 1
    if version is not None:
        print(f"registered {version.name} version {version.version}")
        return 0
    if not Path(args.run_dir).is_dir():
        parser.error(f"no run folder {args.run_dir}")
    versions = register_pending(args.run_dir, trusted=args.trusted)
    for version in versions:
        print(f"registered {version.name} version {version.version} (update {version.tags.get('update')})")
    left = pending_folders(args.run_dir)
    if left:
        print(f"{len(left)} registrations are still pending under {registrations_dir(args.run_dir)}", file=sys.stderr)
        return 1
    return 0
