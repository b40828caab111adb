"""Fixtures of the reliability suite; puts `tests/` on sys.path so its helpers (shardsets, test_audio, ...) import.

`hostile_job` runs the real preprocessing job once per session over the hostile dataset (every bad audio and
CSV row kind, see reliability_support) on a local Ray that it starts and shuts down itself, so no Ray outlives
it and other test modules can start their own.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def hostile_job(tmp_path_factory) -> SimpleNamespace:
    import ray

    from jobs.train.config import load_config
    from jobs.preprocess import run_preprocess
    from reliability_support import build_hostile_dataset, preprocess_config

    root = tmp_path_factory.mktemp("hostile")
    data = build_hostile_dataset(root / "dataset")
    output = root / "shards"
    config = load_config(str(preprocess_config(root / "job.yaml", data, output)))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_preprocess(config, progress=False)
    finally:
        ray.shutdown()
    return SimpleNamespace(data=data, output=output, summary=summary, config=config)
