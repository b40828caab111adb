"""The registered model's folder: an MLflow "model from code" pyfunc built from encoder (+ head) weights.

`save_pyfunc` writes the folder (`mlflow.pyfunc.save_model` with `python_model` = jobs/mlops/pyfunc_model.py, artifacts
`encoder.safetensors` + `model_config.json` (`model_spec`), a signature, an input example and pinned pip
requirements). It owns the shipping of the pyfunc's private code: the modules of `model/` and `pipeline/` that
jobs/mlops/pyfunc_model.py imports (transitively, function bodies included) are copied into
`code/_sslam_pyfunc_<digest>/` of the model folder with every `from model...` / `from pipeline...` rewritten to that
package, and the shipped pyfunc_model.py imports from it. So a registered model loads in an application that has its
own top-level `model`, `pipeline` or `config` modules, leaves those alone, and two versions built from different
code loaded in one process each run their own (the digest names the code).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from jobs.train.checkpointing import sha256_file
from model.checkpoint import ImportedCheckpoint, save_weights
from model.config import ModelConfig
from pipeline.config import AudioConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# The project packages the pyfunc's code may import; they ship inside the model under a private package name.
SHIPPED_PACKAGES = ("model", "pipeline")
PRIVATE_PACKAGE_PREFIX = "_sslam_pyfunc_"
CODE_DIR = "code"  # where save_model puts code_paths inside a model folder
WEIGHTS_FILE = "encoder.safetensors"
CONFIG_FILE = "model_config.json"
WEIGHTS_ARTIFACT = f"artifacts/{WEIGHTS_FILE}"  # where save_model puts the weights inside a model folder
# Input example: this long a test tone at the model's sample rate.
EXAMPLE_SECONDS = 0.5
EXAMPLE_HZ = 440.0


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
