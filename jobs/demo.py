"""`make demo`: the main job on generated data, as far as it exists, one named step after another.

Today: generate the sample dataset, build its manifest, and show the raw fbank features of a few clips.
A failing step stops the demo with the step's name and reason.
"""

from __future__ import annotations

import argparse
import logging
import time
from contextlib import contextmanager
from pathlib import Path

from jobs.config import config_from_args

log = logging.getLogger("sslam.demo")


class DemoStepFailed(RuntimeError):
    pass


@contextmanager
def step(name: str):
    print(f"==> {name}", flush=True)
    started = time.perf_counter()
    try:
        yield
    except Exception as error:
        raise DemoStepFailed(f"step '{name}' failed: {type(error).__name__}: {error}") from error
    print(f"    done in {time.perf_counter() - started:.1f} s", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    from pipeline.audio import AudioError, fbank_batch, load_waveform
    from pipeline.manifest import build_manifest
    from pipeline.synth import make_sample_dataset

    config = config_from_args(args)
    source = config.data.source
    sample_dir = Path(source.class_labels_csv).parent
    try:
        with step(f"make the sample dataset in {sample_dir}"):
            summary = make_sample_dataset(sample_dir, config.data.synth)
            for key, value in sorted(summary.items()):
                print(f"    {key}: {value}")
        with step("build the manifest"):
            manifest, quarantine = build_manifest(source)
            print(f"    {manifest.num_rows} clips in the manifest, {quarantine.num_rows} quarantined")
            for row in quarantine.to_pylist():
                print(f"    quarantined {row['key']}: {row['reason']}")
        with step("features of a few clips"):
            rows = manifest.to_pylist()
            waves, keys = [], []
            for row in rows:
                if len(waves) == 4:
                    break
                try:
                    waves.append(load_waveform(row["path"], config.data.audio))
                    keys.append(row["key"])
                except AudioError as error:
                    print(f"    skipped {error}")
            features = fbank_batch(waves, config.data.audio)
            for key, wave, feats in zip(keys, waves, features):
                print(
                    f"    {key}: {wave.numel() / config.data.audio.sample_rate:5.2f} s -> fbank {tuple(feats.shape)}, "
                    f"min {feats.min():.2f} max {feats.max():.2f} mean {feats.mean():.2f}"
                )
    except DemoStepFailed as error:
        print(f"demo stopped: {error}")
        return 1
    print("demo finished")
    return 0
