"""The MLflow store every command talks to: its URI, a client for it, experiments, and how its errors read.

Where runs go. With no `MLFLOW_TRACKING_URI`, every command uses one project-level store in the working
directory: `sqlite:///mlruns/mlflow.db` for runs and the model registry, `mlruns/artifacts` for artifacts (the
experiment is created with that artifact location). With `MLFLOW_TRACKING_URI=http://...` the same code talks to an
`mlflow server` (basic auth from MLflow's own `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`).
`is_permanent` / `is_refusal` sort MLflow's errors into dropped, refused (tracking ends) and transient (retried);
`param_value` makes a config value an MLflow param.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STORE_DIR = "mlruns"
STORE_DB = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
# MLflow errors that retrying cannot fix (the item is dropped with a warning); anything else counts as transient.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}
# The store answered and refuses writes: tracking of the run ends (jobs.mlops.tracking).
REFUSED_ERRORS = {"PERMISSION_DENIED", "UNAUTHENTICATED"}
REFUSED_HTTP_STATUS = {401, 403}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the project-level SQLite store in the working directory."""
    configured = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if configured:
        return configured
    return "sqlite:///" + str((Path(STORE_DIR) / STORE_DB).resolve())


def default_artifact_location(uri: str) -> str | None:
    """`mlruns/artifacts` for the project-level store; None (the server's or MLflow's choice) otherwise."""
    if uri != "sqlite:///" + str((Path(STORE_DIR) / STORE_DB).resolve()):
        return None
    return (Path(STORE_DIR) / ARTIFACTS_DIR).resolve().as_uri()


def mlflow_client(uri: str | None = None):
    """An MlflowClient for tracking and registry at `uri` (default `tracking_uri()`), the store folder created."""
    import mlflow

    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client, name: str) -> str:
    """The id of experiment `name`, created (with the project artifact location when it applies) if missing."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} is deleted: restore it or choose tracking.experiment")
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_location(client.tracking_uri))
    except MlflowException:  # created meanwhile by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def is_permanent(error: BaseException) -> bool:
    return getattr(error, "error_code", None) in PERMANENT_ERRORS


def is_refusal(error: BaseException) -> bool:
    """The store refuses writes (as opposed to being unreachable, which is retried): an MLflow permission
    error, an HTTP 401 / 403 answer (artifact uploads), or an OS error of a local store."""
    import requests

    if getattr(error, "error_code", None) in REFUSED_ERRORS:
        return True
    if isinstance(error, requests.RequestException):  # before OSError: requests' errors are OSErrors too
        response = getattr(error, "response", None)
        return response is not None and response.status_code in REFUSED_HTTP_STATUS
    return isinstance(error, OSError)


def param_value(value: Any) -> str:
    """A config value as an MLflow param: text, truncated to MLflow's length limit with a marker."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    marker = "...[truncated]"
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
