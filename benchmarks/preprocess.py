"""Benchmark of the Ray preprocessing job end to end: clips/s, and clips/s per CPU given to Ray, for 10 s clips
as 16 kHz mono FLAC and as 44.1 kHz stereo FLAC (decode + down-mix + resample + fbank + mixtures + shard writing),
against the plain per-clip path on the same files in the same run, with a per-stage profile.

    python -m benchmarks.preprocess                     # 1,000 clips per input kind, all CPUs
    python -m benchmarks.preprocess --clips 1000 --cpus 1

Each kind is a folder source of generated clips, preprocessed with the default features (1024 x 128), groups of
3, one mixture epoch, materialised log-mel max mixtures, at least 4 shards per CPU (fewer groups per shard than
the default 64 when the clip count is small). A small warm-up job starts the Ray workers first, so the
timings hold no worker start-up. Then, in this process on one torch thread and the same files:

* the plain per-clip path: `soundfile.read` (float32), channel mean, `torchaudio.functional.resample`,
  `torchaudio.compliance.kaldi.fbank` (the §1.7 arguments on the mean-removed clip), one clip at a time;
* a profile of the task's stages in ms per clip: decode (read + checks + down-mix), resample, fbank (one batched
  call per 64 clips, as a shard task does), mixtures (log-mel max, groups of 3), sample encoding (float16 cast,
  .npy, json and the round-trip check, clean and mixture arrays), tar + sha256; beside it the task's own time
  per clip (the difference is records, file writes, fsync and Ray, when the load stayed the same).

Wall-clock figures depend on the load of a shared machine; the CPU-time figures (time.process_time) of the plain
path and of the profile much less: `profile_cpu_vs_plain_cpu` compares the task's work without file writes and
Ray with the plain path, per CPU second.

Prints one JSON line: per kind, clips/s over the whole job (manifest, plan, tasks, index, ledger) and over the
task phase alone, each also per CPU; the plain path's clips/s; `task_vs_plain` = task clips/s per CPU over the
plain path's clips/s; the profile; and the load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import soundfile
import torch
import torchaudio

from pipeline import audio, mixing, shards
from pipeline.config import AudioConfig, DataConfig, SourceConfig
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


def plain_path(paths: list[Path], cfg: AudioConfig) -> tuple[float, float]:
    """(clips per wall second, clips per CPU second) of the per-clip path without this project's front-end:
    soundfile, channel mean, torchaudio resample, kaldi.fbank."""
    wall, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
        wave = torch.from_numpy(samples.mean(axis=1, dtype=np.float32))
        if rate != cfg.sample_rate:
            wave = torchaudio.functional.resample(wave, rate, cfg.sample_rate)
        features = audio.kaldi_reference(wave, cfg)[: cfg.target_length]
        torch.nn.functional.pad(features, (0, 0, 0, cfg.target_length - features.shape[0]))
    return len(paths) / (time.perf_counter() - wall), len(paths) / (time.process_time() - cpu)


def stage_profile(paths: list[Path], data: DataConfig) -> dict[str, dict[str, float]]:
    """Wall and CPU ms per clip of each stage of a shard task, run here on one thread over `paths`."""
    cfg, group = data.audio, data.mixing.group_size
    time_patches = cfg.target_length // PATCH_SIZE
    rows = mixing.nomix_rows(time_patches)
    stages = ["decode", "resample", "fbank", "mixtures", "encode", "tar_sha256"]
    wall, cpu = dict.fromkeys(stages, 0.0), dict.fromkeys(stages, 0.0)

    def timed(stage: str, run: Callable[[], object]) -> object:
        started_wall, started_cpu = time.perf_counter(), time.process_time()
        result = run()
        wall[stage] += time.perf_counter() - started_wall
        cpu[stage] += time.process_time() - started_cpu
        return result

    decoded = [timed("decode", lambda path=path: audio.decode(path, cfg)) for path in paths]
    waves = [timed("resample", lambda d=d: audio.to_model_rate(d[0], d[1], cfg)) for d in decoded]
    features = torch.cat([timed("fbank", lambda first=first: audio.fbank_batch(waves[first : first + 64], cfg))
                          for first in range(0, len(waves), 64)])
    frames = [min(audio.frame_count(wave.numel(), cfg), cfg.target_length) for wave in waves]
    windows = [(0, time_patches - rows)] * group
    nomix = torch.from_numpy(np.stack([mixing.nomix_mask(i1, i2, rows, time_patches) for i1, i2 in windows]))
    partner = torch.tensor([(i - 1) % group for i in range(group)])
    samples = []
    for first in range(0, len(paths) - group + 1, group):
        clean = features[first : first + group]
        valid = torch.tensor(frames[first : first + group])
        mixed = timed("mixtures", lambda: mixing.logmel_max_batch(clean, partner, nomix, PATCH_SIZE, "zero", valid))
        members = timed("encode", lambda: shards.encode_sample(
            clips=list(clean), clip_keys=[f"clip{first + i}" for i in range(group)], labels=[[0]] * group,
            filler=[False] * group, windows=windows, rows=rows, domain="logmel_max", seed=0, mixtures=list(mixed),
            frames=frames[first : first + group]))
        samples.append((f"s{first:06d}", members))
    timed("tar_sha256", lambda: hashlib.sha256(shards.shard_bytes(samples)).hexdigest())
    return {name: {stage: round(1000 * total / len(paths), 3) for stage, total in totals.items()}
            for name, totals in (("wall", wall), ("cpu", cpu))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000, help="clips per input kind")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--workdir", default=None, help="where to put audio and shards (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile-clips", type=int, default=300, help="clips of the plain path and the profile")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sslam-bench-preprocess-"))
    cpus = args.cpus or os.cpu_count() or 1
    load_before = os.getloadavg()
    torch.set_num_threads(1)  # the driver's own measurements; the tasks set one thread themselves
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
            paths = sorted(audio_root.glob("*.flac"))[: args.profile_clips]
            plain, plain_cpu = plain_path(paths, DataConfig().audio)
            profile = stage_profile(paths, DataConfig())
            results[kind] = {
                "clips_per_s": round(args.clips / elapsed, 2),
                "clips_per_s_per_cpu": round(args.clips / elapsed / cpus, 2),
                "task_clips_per_s": round(summary["clips_per_s"], 2),
                "task_clips_per_s_per_cpu": round(summary["clips_per_s"] / cpus, 2),
                "plain_per_clip_clips_per_s": round(plain, 2),
                "task_vs_plain": round(summary["clips_per_s"] / cpus / plain, 2),
                "plain_per_clip_clips_per_cpu_s": round(plain_cpu, 2),
                "profile_ms_per_clip": profile["wall"],
                "profile_sum_ms": round(sum(profile["wall"].values()), 3),
                "profile_cpu_ms_per_clip": profile["cpu"],
                "profile_cpu_clips_per_s": round(1000 / sum(profile["cpu"].values()), 2),
                "profile_cpu_vs_plain_cpu": round(1000 / sum(profile["cpu"].values()) / plain_cpu, 2),
                "task_ms_per_clip_per_cpu": round(1000 * cpus / summary["clips_per_s"], 3),
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
                "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "cpu_count": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
