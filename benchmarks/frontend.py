"""Benchmark of the feature front-end on one CPU thread: `kaldi.fbank` called per clip (what the reference does)
against `pipeline.audio.fbank_batch` at several batch sizes, on random 10 s clips at the model rate.

    python -m benchmarks.frontend                       # 256 clips, batch sizes 1, 16, 64
    python -m benchmarks.frontend --clips 64 --batch-sizes 16

Prints one JSON line: clips/s of each method (best of --repeats interleaved passes over all clips), the speed-up over the
per-clip baseline, and the largest difference from Kaldi on the valid frames.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable

import torch

from pipeline.audio import fbank_batch, frame_count, kaldi_reference
from pipeline.config import AudioConfig


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
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
