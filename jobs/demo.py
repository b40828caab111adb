"""`make demo`: the whole pipeline on generated data, one named step after another, on CPU in minutes.

sample dataset -> Ray preprocessing (local Ray) -> stage 1 then stage 2 tiny pre-training (DeepSpeed, two
CPU ranks; GPUs when present) -> registered model in the project-level MLflow store -> linear-probe
evaluation -> a summary of where everything is. A failing step stops the demo with its name and reason.
The tiny presets move no alias; the demo's stage 2 asks for `candidate` (DEMO_ALIAS), the alias it evaluates.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from jobs.train.config import config_from_args, load_config

log = logging.getLogger("sslam.demo")

DEMO_ALIAS = "candidate"


class DemoStepFailed(RuntimeError):
    pass


@contextmanager
def step(name: str):
    print(f"\n==> {name}", flush=True)
    started = time.perf_counter()
    try:
        yield
    except Exception as error:
        raise DemoStepFailed(f"step '{name}' failed: {type(error).__name__}: {error}") from error
    print(f"    done in {time.perf_counter() - started:.1f} s", flush=True)


def _pretrain(config_name: str, ranks: int, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "jobs.cli", "pretrain", "--config", config_name, "--ranks", str(ranks)]
    for override in overrides:
        command += ["--set", override]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    code = subprocess.call(command, env=env)
    if code:
        raise RuntimeError(f"`{' '.join(command)}` exited with {code}")


def run_demo(args: argparse.Namespace) -> int:
    from jobs.evaluate import evaluate
    from jobs.preprocess import run_preprocess
    from jobs.mlops.registry import register_pending
    from jobs.mlops.client import tracking_uri
    from pipeline.inspect import render_groups, summarize
    from pipeline.synth import make_sample_dataset

    config = config_from_args(args)
    stage1, stage2 = load_config("tiny_stage1"), load_config("tiny_stage2")
    sample_dir = Path(config.data.source.class_labels_csv).parent
    shards = config.data.shards.output
    ranks = args.ranks
    try:
        with step(f"1/6 make the sample dataset in {sample_dir}"):
            summary = make_sample_dataset(sample_dir, config.data.synth)
            print(f"    {summary['splits']['train']['rows']} train rows, {summary['splits']['eval']['rows']} eval rows, "
                  f"{len(summary['classes'])} classes, broken files: {', '.join(summary['broken'])}")
        with step(f"2/6 preprocess with Ray into {shards}"):
            result = run_preprocess(config)
            print(summarize(shards))
            preview = render_groups(shards, Path(shards) / "preview.png")
            print(f"    preview of two mixture groups: {preview}")
        with step(f"3/6 stage 1 (EAT) pre-training, {ranks} DeepSpeed ranks -> {stage1.train.output_dir}"):
            _pretrain("tiny_stage1", ranks, [f"data.loader.shards={shards}"])
        with step(f"4/6 stage 2 (SSLAM) pre-training from stage 1 -> {stage2.train.output_dir}"):
            _pretrain("tiny_stage2", ranks, [f"data.loader.shards={shards}", f"tracking.aliases=[{DEMO_ALIAS}]"])
        with step("5/6 registered model"):
            versions = register_pending(stage2.train.output_dir)
            model_uri = f"models:/{stage2.tracking.model_name}@{DEMO_ALIAS}"
            print(f"    {model_uri} ({len(versions)} pending registrations completed now)")
        with step("6/6 evaluate: linear probe on frozen features vs the label prior"):
            metrics = evaluate(model_uri, shards, shards, load_config("probe"), promote=True)
            print("    " + json.dumps(metrics, sort_keys=True))
    except DemoStepFailed as error:
        print(f"\ndemo stopped: {error}", flush=True)
        return 1
    print(
        "\n==> summary\n"
        f"    sample audio + CSVs   {sample_dir}\n"
        f"    shards + dataset.json {shards} ({result['shards']['total']} shards, {result['samples']} samples)\n"
        f"    stage 1 checkpoints   {stage1.train.output_dir}/checkpoints\n"
        f"    stage 2 checkpoints   {stage2.train.output_dir}/checkpoints\n"
        f"    MLflow store          {tracking_uri()}\n"
        f"    registered model      {model_uri}\n"
        f"    open the MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {tracking_uri()}\n",
        flush=True,
    )
    return 0
