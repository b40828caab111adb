"""Benchmark of the Ray preprocessing job end to end: clips/s, and clips/s per CPU given to Ray, for 10 s clips
as 16 kHz mono FLAC and as 44.1 kHz stereo FLAC (decode + down-mix + resample + fbank + mixtures + shard writing).

    python -m benchmarks.preprocess                     # 1,000 clips per input kind, all CPUs
    python -m benchmarks.preprocess --clips 200 --cpus 2

Each kind is a folder source of generated clips, preprocessed with the default features (1024 x 128), groups of
3, one mixture epoch, materialised log-mel max mixtures, at least 4 shards per CPU (fewer groups per shard than
the default 64 when the clip count is small). A small warm-up job starts the Ray workers first, so the
timings hold no worker start-up. Prints one JSON line: per kind, clips/s over the whole job (manifest, plan, tasks,
index, ledger) and over the task phase alone, each also per CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import soundfile

from pipeline.config import DataConfig, SourceConfig
from pipeline.preprocess import run_pipeline

PATCH_SIZE = 16
KINDS = {"flac_16k_mono": (16000, 1), "flac_44k1_stereo": (44100, 2)}


def write_clips(directory: Path, count: int, sample_rate: int, channels: int, seconds: float, seed: int) -> None:
    """`count` FLAC clips: a few tones over noise, different per clip."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    for index in range(count):
        tones = sum(np.sin(2 * np.pi * rng.uniform(100, 4000) * t) for _ in range(3))
        mono = 0.1 * tones + 0.02 * rng.standard_normal(t.size)
        samples = np.stack([mono * rng.uniform(0.6, 1.0) for _ in range(channels)], axis=1)
        soundfile.write(directory / f"clip{index:06d}.flac", samples.astype(np.float32), sample_rate, subtype="PCM_16")


def groups_per_shard(clips: int, cpus: int, group_size: int) -> int:
    """The default (64) unless that leaves fewer than 4 shards per CPU, which would idle CPUs at the end."""
    return max(1, min(64, clips // (group_size * 4 * cpus)))


def preprocess(audio_root: Path, output: Path, cpus: int) -> dict:
    data = DataConfig()
    data.source = SourceConfig(kind="folder", audio_root=str(audio_root), extensions=["flac"])
    data.mixing.mixture_epochs = 1
    data.shards.output = str(output)
    clips = len(list(audio_root.glob("*.flac")))
    data.shards.groups_per_shard = groups_per_shard(clips, cpus, data.mixing.group_size)
    return run_pipeline(data, PATCH_SIZE, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000, help="clips per input kind")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--workdir", default=None, help="where to put audio and shards (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sslam-bench-preprocess-"))
    cpus = args.cpus or os.cpu_count() or 1
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        warm_up = workdir / "warm-up"
        write_clips(warm_up / "audio", 3 * cpus, 16000, 1, args.seconds, args.seed)
        preprocess(warm_up / "audio", warm_up / "shards", cpus)
        results = {}
        for offset, (kind, (sample_rate, channels)) in enumerate(KINDS.items(), start=1):
            audio_root = workdir / kind / "audio"
            write_clips(audio_root, args.clips, sample_rate, channels, args.seconds, args.seed + offset)
            started = time.perf_counter()
            summary = preprocess(audio_root, workdir / kind / "shards", cpus)
            elapsed = time.perf_counter() - started
            results[kind] = {
                "clips_per_s": round(args.clips / elapsed, 2),
                "clips_per_s_per_cpu": round(args.clips / elapsed / cpus, 2),
                "task_clips_per_s": round(summary["clips_per_s"], 2),
                "task_clips_per_s_per_cpu": round(summary["clips_per_s"] / cpus, 2),
                "seconds": round(elapsed, 2),
                "shards": summary["shards"]["total"],
                "mib_written": round(summary["bytes"] / 2**20, 1),
            }
            shutil.rmtree(workdir / kind, ignore_errors=True)
    finally:
        ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "preprocess",
                "clips": args.clips,
                "seconds_per_clip": args.seconds,
                "cpus": cpus,
                "features": "1024 x 128, groups of 3, 1 mixture epoch, logmel_max materialised",
                "groups_per_shard": groups_per_shard(args.clips, cpus, 3),
                "results": results,
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
