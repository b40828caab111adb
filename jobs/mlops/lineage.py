"""Lineage in MLflow: who ran what from which code, on which shard set, and which versions a logged model became.

- `lineage_tags(entry_point)`: MLflow's own run tags `mlflow.source.name` (the entry point, e.g. `jobs.pretrain`),
  `mlflow.source.type` (LOCAL), `mlflow.user` (MLflow's rule: `MLFLOW_TRACKING_USERNAME`, else the login name) and
  `mlflow.source.git.commit` when the code is a git checkout: the UI's Source, Created by and commit link. Training,
  evaluation runs, logged models and model versions carry them.
- `shard_set_input(dataset_info, location)`: the shard set as a dataset input of a run (the UI's Datasets panel):
  name = dataset.json's `name`, digest = its fingerprint (MLflow keeps 36 characters; the profile has it whole),
  source = the shard location's URI, profile = the counts of dataset.json (shards, samples, clips, bytes per split,
  classes, mixture epochs), schema = the fbank tensor a sample holds.
- `link_version(client, model_id, name, version)`: the logged model's `mlflow.modelVersions` tag, as
  `mlflow.register_model` keeps it (a JSON list of {name, version}); idempotent, so a retried registration does not
  list a version twice.
- `system_metrics_interval(elapsed_s, configured_s)`: the sampling interval of the tracker's system metrics.
"""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
USER = "mlflow.user"
GIT_COMMIT = "mlflow.source.git.commit"
MODEL_VERSIONS = "mlflow.modelVersions"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS
DATASET_CONTEXT = "mlflow.data.context"
TRAINING_CONTEXT = "training"
MAX_DIGEST = 36  # MLflow's limit on a dataset digest
# Adaptive sampling: an interval of 1/SAMPLES_PER_RUN of the time elapsed so far, within these bounds; a run of
# 3 s gets samples at 1 s, a run of hours MLflow's default 10 s.
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 10.0
SAMPLES_PER_RUN = 20


def git_commit() -> str | None:
    """HEAD of the repository holding this code, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def tracking_user() -> str:
    """Who runs this: MLflow's rule (the tracking server's user name when set, else the login name)."""
    from mlflow.utils.credentials import read_mlflow_creds

    username = read_mlflow_creds().username
    if username:
        return username
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        return "unknown"


def default_entry_point() -> str:
    """The running program as MLflow names a source: the `-m` module, else the script's file name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "<console>"


def lineage_tags(entry_point: str | None = None) -> dict[str, str]:
    """Source, user and git commit tags (module docstring); `entry_point` defaults to the running program."""
    from mlflow.entities import SourceType

    tags = {
        SOURCE_NAME: entry_point or default_entry_point(),
        SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
        USER: tracking_user(),
    }
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT] = commit
    return tags


def shard_location_uri(location: str) -> tuple[str, str]:
    """(source type, URI) of a shard location: `local` and a file:// URI for a path, else the URL's scheme."""
    scheme = urlparse(location).scheme
    if len(scheme) > 1:  # not a Windows drive letter
        return scheme, location
    return "local", Path(location).expanduser().resolve().as_uri()


def shard_set_profile(dataset_info: dict) -> dict:
    """The counts of a dataset.json: per split shards (all mixture epochs), samples, clips, bytes; totals."""
    splits = {}
    for split, entry in sorted((dataset_info.get("splits") or {}).items()):
        shards = sum(len(names) for names in (entry.get("shards_per_epoch") or {}).values())
        splits[split] = {
            "shards": shards,
            "samples": int(entry.get("samples", 0)),
            "clips": int(entry.get("clips", 0)),
            "bytes": int(entry.get("bytes", 0)),
            "mix": bool(entry.get("mix", False)),
        }
    return {
        "fingerprint": str(dataset_info.get("fingerprint", "")),
        "splits": splits,
        "shards": sum(s["shards"] for s in splits.values()),
        "samples": sum(s["samples"] for s in splits.values()),
        "clips": sum(s["clips"] for s in splits.values()),
        "bytes": int(dataset_info.get("bytes", sum(s["bytes"] for s in splits.values()))),
        "classes": len(dataset_info.get("classes") or []),
        "mixture_epochs": int(dataset_info.get("mixture_epochs", 0)),
    }


def shard_set_schema(dataset_info: dict) -> str | None:
    """MLflow's tensor-spec schema of one sample's fbank (frames x mel bins), when dataset.json records them."""
    frames, bins = dataset_info.get("target_length"), dataset_info.get("mel_bins")
    if not frames or not bins:
        return None
    features = [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 1, int(frames), int(bins)]},
                 "name": "fbank"}]
    return json.dumps({"mlflow_tensorspec": {"features": json.dumps(features), "targets": None}})


def shard_set_input(dataset_info: dict, location: str, context: str = TRAINING_CONTEXT):
    """A DatasetInput of the shard set at `location` described by its dataset.json (module docstring)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type, uri = shard_location_uri(location)
    dataset = Dataset(
        name=str(dataset_info.get("name") or "shards"),
        digest=str(dataset_info.get("fingerprint") or "unknown")[:MAX_DIGEST],
        source_type=source_type,
        source=json.dumps({"uri": uri}),
        schema=shard_set_schema(dataset_info),
        profile=json.dumps(shard_set_profile(dataset_info)),
    )
    return DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT, context)])


def link_version(client, model_id: str, name: str, version) -> None:
    """List `name` version `version` in the logged model's `mlflow.modelVersions` tag (once)."""
    logged = client.get_logged_model(model_id)
    try:
        listed = json.loads(logged.tags.get(MODEL_VERSIONS) or "[]")
    except json.JSONDecodeError:
        listed = []
    if any(e.get("name") == name and str(e.get("version")) == str(version) for e in listed if isinstance(e, dict)):
        return
    client.set_logged_model_tags(model_id, {MODEL_VERSIONS: json.dumps([*listed, {"name": name, "version": version}])})


def system_metrics_interval(elapsed_s: float, configured_s: float = 0.0) -> float:
    """`configured_s` when positive, else 1/20 of the time elapsed, within [1 s, 10 s]."""
    if configured_s > 0:
        return configured_s
    return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, elapsed_s / SAMPLES_PER_RUN))
