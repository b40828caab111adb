"""A registered model runs its own private copy of the project code (jobs.mlops.pyfunc_package.write_private_code): it loads
and predicts in an application that already imported top-level `model`, `pipeline` and `config` modules of its
own, leaves them alone, and pulls nothing from the project checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from jobs.mlops import pyfunc_package, registry
from jobs.train.config import load_config
from jobs.mlops.client import mlflow_client
from model.features import extract_features
from registry_support import MLFLOW_ENV, seeded_checkpoint, use_store

MODEL = "sslam-isolated"
CPU = {"device": "cpu"}
# An application's own top-level modules, named like the project's packages (plain modules, not packages).
APP_MODULES = ("model", "pipeline", "config")

APP_SCRIPT = """
import json, sys
import model, pipeline, config  # the application's own, imported first
own = {name: sys.modules[name] for name in ("model", "pipeline", "config")}
import mlflow, numpy as np, pandas as pd

loaded = mlflow.pyfunc.load_model(sys.argv[1], model_config={"device": "cpu"})
fbank = np.load(sys.argv[2])
predicted = loaded.predict(pd.DataFrame({"fbank": [clip.tolist() for clip in fbank]}))
np.savez(sys.argv[3], utterance=predicted["utterance"], frames=predicted["frames"])
print(json.dumps({
    "still_own": all(sys.modules[name] is module for name, module in own.items()),
    "app_values": [model.WHO, pipeline.WHO, config.WHO],
    "project_modules": sorted(n for n in sys.modules if n.split(".")[0] in ("jobs", "model", "pipeline") and "." in n
                              or n == "jobs"),
    "private_files": sorted({m.__file__.split("/code/")[0] for n, m in sys.modules.items()
                             if n.startswith("_sslam_pyfunc_") and getattr(m, "__file__", None)}),
}))
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """One registered version of a seeded tiny encoder in a project-level store under a temporary folder."""
    root = tmp_path_factory.mktemp("isolation")
    with pytest.MonkeyPatch.context() as patch:
        use_store(patch, root)
        config = load_config("tiny_stage1", [f"tracking.model_name={MODEL}", "train.output_dir=runs/iso"])
        tag_dir, model = seeded_checkpoint(root / "runs" / "iso", config, 7)
        modules_before = set(sys.modules)
        version = registry.register_checkpoint(tag_dir)
        saved_private = sorted(m for m in set(sys.modules) - modules_before if m.startswith("_sslam_pyfunc_"))
        yield SimpleNamespace(root=root, model=model, uri=f"models:/{MODEL}/{version.version}",
                              tracking_uri=mlflow_client().tracking_uri, saved_private=saved_private)


def app_folder(root: Path) -> Path:
    app = root / "app"
    app.mkdir(exist_ok=True)
    for name in APP_MODULES:
        (app / f"{name}.py").write_text(f'WHO = "app {name}"\n')
    return app


def test_registered_model_loads_next_to_an_apps_own_model_and_pipeline_modules(registered):
    """Tried: an application whose sys.path starts with its own model.py, pipeline.py and config.py, imported
    before mlflow.pyfunc.load_model(models:/...).predict. Survives: the prediction equals the in-process one; the
    application's modules are still its own; no project module (jobs, model.*, pipeline.*) was imported."""
    app = app_folder(registered.root)
    fbank = (-4.0 + 3.0 * torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(3))).numpy()
    np.save(app / "fbank.npy", fbank)
    (app / "main.py").write_text(textwrap.dedent(APP_SCRIPT))
    env = {key: value for key, value in os.environ.items() if key not in MLFLOW_ENV and key != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=registered.tracking_uri, PYTHONPATH=str(app), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(app / "main.py"), registered.uri, str(app / "fbank.npy"), str(app / "out.npz")],
        cwd=app, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["still_own"] is True
    assert report["app_values"] == [f"app {name}" for name in APP_MODULES]
    assert report["project_modules"] == []
    assert len(report["private_files"]) == 1  # the downloaded model's own code folder

    in_process = mlflow.pyfunc.load_model(registered.uri, model_config=CPU).predict(
        pd.DataFrame({"fbank": [clip.tolist() for clip in fbank]}))
    isolated = np.load(app / "out.npz")
    np.testing.assert_allclose(isolated["utterance"], in_process["utterance"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(isolated["frames"], in_process["frames"], rtol=0, atol=1e-5)
    expected = extract_features(registered.model.encoder, torch.from_numpy(fbank))
    np.testing.assert_allclose(in_process["utterance"], expected["utterance"].numpy(), atol=1e-5)


def test_the_model_folder_ships_only_private_code(registered):
    """No file of the registered model imports a top-level `model` / `pipeline`, and saving it left nothing
    imported from its staging folder in the registering process."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered.uri,
                                                     dst_path=str(registered.root / "download")))
    [package] = (local / pyfunc_package.CODE_DIR).iterdir()
    assert package.name.startswith(pyfunc_package.PRIVATE_PACKAGE_PREFIX)
    assert {"model/checkpoint.py", "model/encoder.py", "pipeline/audio.py", "pipeline/config.py"} <= {
        p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    assert not (package / "pipeline" / "preprocess.py").exists()  # only what the pyfunc needs
    for source in [local / "pyfunc_model.py", *package.rglob("*.py")]:
        assert pyfunc_package._project_imports(source) == [], source
    assert registered.saved_private == []


def test_the_private_package_name_follows_the_code_and_unshippable_imports_are_refused(tmp_path, monkeypatch):
    first, _ = pyfunc_package.write_private_code(tmp_path / "a")
    changed = tmp_path / "pyfunc_model.py"
    changed.write_text(pyfunc_package.PYFUNC_FILE.read_text() + "\n# another version of the code\n")
    monkeypatch.setattr(pyfunc_package, "PYFUNC_FILE", changed)
    second, _ = pyfunc_package.write_private_code(tmp_path / "b")
    name = lambda path: next((path.parent / pyfunc_package.CODE_DIR).iterdir()).name  # noqa: E731
    assert name(first) != name(second)

    for text, message in [("import model.encoder\n", "`import model.encoder`"),
                          ("from jobs.mlops.registry import BEST\n", "does not ship"),
                          ("from .config import X\n", "relative import"),
                          ("from model.nowhere import X\n", "not a module")]:
        bad = tmp_path / "bad.py"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            pyfunc_package.shipped_modules(bad)
