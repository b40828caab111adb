"""Benchmark of the feature front-end on one CPU thread: `kaldi.fbank` called per clip (what the reference does)
against `pipeline.audio.fbank_batch` at several batch sizes, on random 10 s clips at the model rate; and the cost
of `load_waveform` (decode, down-mix, resample) against file length, which head decoding keeps flat.

    python -m benchmarks.frontend                       # 256 clips, batch sizes 1, 16, 64
    python -m benchmarks.frontend --clips 64 --batch-sizes 16

Prints one JSON line: clips/s of each method (best of --repeats interleaved passes over all clips), the speed-up over the
per-clip baseline, and the largest difference from Kaldi on the valid frames; then `load_waveform_ms`, best of
--repeats, per FLAC file of 10 s, 60 s and 1 h (16 kHz mono) and 10 s and 60 s (44.1 kHz stereo), beside
`whole_file_ms`, the cost of decoding and resampling the whole file (what the front-end did before).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile
import torch

from pipeline.audio import decode, fbank_batch, frame_count, kaldi_reference, load_waveform, to_model_rate
from pipeline.config import AudioConfig

LONG_FILES = {"10s_16k_mono": (10, 16000, 1), "60s_16k_mono": (60, 16000, 1), "3600s_16k_mono": (3600, 16000, 1),
              "10s_44k1_stereo": (10, 44100, 2), "60s_44k1_stereo": (60, 44100, 2)}


def kaldi_per_clip(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """The per-clip reference front-end, padded / head-cropped like `fbank_batch`."""
    feats = kaldi_reference(wave, cfg)[: cfg.target_length]
    return torch.nn.functional.pad(feats, (0, 0, 0, cfg.target_length - feats.shape[0]))


def best_clips_per_second(runs: dict[str, Callable[[], None]], clips: int, repeats: int) -> dict[str, float]:
    """Best of `repeats` timed passes per method; the methods take turns so that load from other processes
    on a shared machine falls on all of them alike."""
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: clips / seconds for name, seconds in best.items()}


def write_flac(path: Path, seconds: int, rate: int, channels: int, seed: int) -> None:
    """Tones over noise, written 10 s at a time (an hour never sits in memory)."""
    rng = np.random.default_rng(seed)
    t = np.arange(10 * rate) / rate
    block = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.02 * rng.standard_normal(t.size)
    with soundfile.SoundFile(path, "w", rate, channels, subtype="PCM_16", format="FLAC") as sound:
        for _ in range(seconds // 10):
            sound.write(np.stack([block] * channels, axis=1).astype(np.float32))


def best_ms(run: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return round(1000 * best, 2)


def file_length_costs(cfg: AudioConfig, repeats: int) -> dict[str, dict[str, float]]:
    def whole_file(path: Path) -> None:
        samples, rate = decode(path, cfg)
        to_model_rate(samples, rate, cfg)

    costs: dict[str, dict[str, float]] = {"load_waveform_ms": {}, "whole_file_ms": {}}
    with tempfile.TemporaryDirectory(prefix="sslam-bench-frontend-") as directory:
        for seed, (name, (seconds, rate, channels)) in enumerate(LONG_FILES.items()):
            path = Path(directory) / f"{name}.flac"
            write_flac(path, seconds, rate, channels, seed)
            costs["load_waveform_ms"][name] = best_ms(lambda: load_waveform(path, cfg), repeats)
            costs["whole_file_ms"][name] = best_ms(lambda: whole_file(path), min(repeats, 2))
            path.unlink()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    cfg = AudioConfig()
    generator = torch.Generator().manual_seed(args.seed)
    samples = round(args.seconds * cfg.sample_rate)
    waves = [0.1 * torch.randn(samples, generator=generator) for _ in range(args.clips)]

    # Warm-up (caches, lazy initialisation) and accuracy on the first clips.
    head = waves[: min(8, args.clips)]
    valid = min(frame_count(samples, cfg), cfg.target_length)
    batched = fbank_batch(head, cfg)
    reference = torch.stack([kaldi_per_clip(wave, cfg) for wave in head])
    max_abs_diff = float((batched[:, :valid] - reference[:, :valid]).abs().max())

    def run_kaldi() -> None:
        for wave in waves:
            kaldi_per_clip(wave, cfg)

    def run_batched(batch_size: int) -> Callable[[], None]:
        def run() -> None:
            for first in range(0, len(waves), batch_size):
                fbank_batch(waves[first : first + batch_size], cfg)

        return run

    rates = best_clips_per_second(
        {"kaldi": run_kaldi} | {str(size): run_batched(size) for size in args.batch_sizes}, args.clips, args.repeats
    )
    baseline = rates.pop("kaldi")
    batched_rates = rates
    record = {
        "benchmark": "frontend",
        "clips": args.clips,
        "seconds_per_clip": args.seconds,
        "threads": torch.get_num_threads(),
        "kaldi_per_clip_clips_per_s": round(baseline, 1),
        "fbank_batch_clips_per_s": {size: round(rate, 1) for size, rate in batched_rates.items()},
        "speedup": {size: round(rate / baseline, 2) for size, rate in batched_rates.items()},
        "max_abs_diff_vs_kaldi": max_abs_diff,
        **file_length_costs(cfg, args.repeats),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
