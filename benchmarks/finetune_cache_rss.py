"""Resident memory of fine-tuning's train split held in memory against the clip cache (jobs.train.finetune_cache).

    python benchmarks/finetune_cache_rss.py --clips 2000 --workdir /tmp/ftcache-rss

Writes a synthetic labelled shard set of `--clips` random (frames x mel_bins) float16 clips once, then, each in
a fresh process: load_split in memory, load_split building the cache, load_split reusing it; each then draws
`--batches` micro-batches of `--micro-batch` random rows as the training loop does. Prints one JSON line per mode:
peak RSS (ru_maxrss, file-backed pages included), then after the batches RssAnon (the process's own memory)
and RssFile (mapped page cache of the cache files, which the kernel can drop) and the load time.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODES = ("memory", "cache-build", "cache-reuse")
CLIPS_PER_SHARD = 250
NUM_CLASSES = 527


def write_shard_set(folder: Path, clips: int, frames: int, mel_bins: int) -> None:
    from pipeline import shards, storage
    from pipeline.plan import sample_key, shard_name

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names, index_rows = [], []
    for shard, start in enumerate(range(0, clips, CLIPS_PER_SHARD)):
        samples = []
        for i in range(start, min(start + CLIPS_PER_SHARD, clips)):
            key = sample_key("train", 0, shard, i - start)
            clip = rng.standard_normal((frames, mel_bins), dtype=np.float32).astype(np.float16)
            labels = sorted(set(rng.integers(0, NUM_CLASSES, 2).tolist()))
            samples.append((key, shards.encode_eval_sample(clip, key, labels)))
        name = shard_name("train", 0, shard)
        shards.write_shard(samples, storage.locate(folder), name)
        index_rows += shards.index_rows(name, samples)
        names.append(name)
    storage.locate(folder).write_table("index.parquet", shards.index_table(index_rows))
    info = {"splits": {"train": {"mix": False, "shards_per_epoch": {"0": names}, "samples": clips}},
            "target_length": frames, "mel_bins": mel_bins, "patch_size": 16,
            "classes": [{"index": k, "mid": f"/m/{k}", "name": f"class {k}"} for k in range(NUM_CLASSES)],
            "fingerprint": f"rss-benchmark-{clips}-{frames}x{mel_bins}"}
    (folder / "dataset.json").write_text(json.dumps(info))


def rss_mib(kind: str) -> float:
    """RssAnon or RssFile of this process (/proc/self/status), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(args: argparse.Namespace) -> dict:
    from jobs.train.config import load_config
    from jobs.train.finetune_data import load_split

    shape = [f"{section}.{field}={value}" for section in ("data.audio", "model")
             for field, value in (("target_length", args.frames), ("mel_bins", args.mel_bins))]
    config = load_config("finetune_as20k", [f"data.loader.num_workers={args.workers}", *shape])
    cache = "" if args.mode == "memory" else str(args.workdir / "cache")
    start = time.perf_counter()
    clips = load_split(config.data, str(args.workdir / "shards"), "train", cache_dir=cache)
    load_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    checksum = 0.0
    for _ in range(args.batches):
        rows = torch.randint(len(clips.keys), (args.micro_batch,), generator=generator)
        checksum += float(clips.fbank[rows].float().sum()) + float(clips.labels[rows].sum())
    return {"mode": args.mode, "clips": len(clips.keys), "fbank_gib": len(clips.keys) * args.frames * args.mel_bins
            * 2 / 2**30, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_anon_mib": round(rss_mib("RssAnon")), "rss_file_mib": round(rss_mib("RssFile")), "load_s": round(load_s, 1), "checksum": round(checksum, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--mel-bins", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=96)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ftcache-rss"))
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(measure(args)))
        return
    if not (args.workdir / "shards" / "dataset.json").is_file():
        write_shard_set(args.workdir / "shards", args.clips, args.frames, args.mel_bins)
    shutil.rmtree(args.workdir / "cache", ignore_errors=True)  # cache-build starts without one
    for mode in MODES:
        command = [sys.executable, *sys.argv, "--mode", mode]
        print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
