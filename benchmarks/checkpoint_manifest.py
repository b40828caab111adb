"""Cost of checkpoint completeness at ViT-B size: saving a DeepSpeed-like optimizer shard with torch.save
straight to a file (with and without fsync) against through `RecordingCheckpointEngine` (hashed while written,
then synced), and
checking a checkpoint folder on resume by sizes (the default) against re-hashing every file
(`train.verify_checkpoint_checksums`).

    python -m benchmarks.checkpoint_manifest                  # 88M parameters (ViT-B student + decoder)
    python -m benchmarks.checkpoint_manifest --params 10000000 --dir /tmp

Prints one JSON line: seconds of each (best of --repeats), the folder's size and the hash rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from jobs.train import checkpointing


class _TorchEngine:
    zipfile_serialization = False  # DeepSpeed's default for its torch checkpoint engine


def _save_synced(state: dict, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(state, handle, _use_new_zipfile_serialization=False)
        handle.flush()
        os.fsync(handle.fileno())


def _best(function, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=88_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    # One rank's optimizer shard of a 1-rank run: fp32 master + two Adam moments.
    state = {"fp32": torch.randn(args.params), "exp_avg": torch.randn(args.params),
             "exp_avg_sq": torch.rand(args.params)}
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        plain = folder / "plain.pt"
        hashed = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        engine = checkpointing.RecordingCheckpointEngine(_TorchEngine())
        plain_s = _best(lambda: torch.save(state, plain, _use_new_zipfile_serialization=False), args.repeats)
        synced_s = _best(lambda: _save_synced(state, plain), args.repeats)
        hashed_s = _best(lambda: engine.save(state, str(hashed)), args.repeats)
        plain.unlink()
        checkpointing.write_manifest(folder, engine.records)
        size_check_s = _best(lambda: checkpointing.verify(folder), args.repeats)
        rehash_s = _best(lambda: checkpointing.verify(folder, rehash=True), args.repeats)
        size = hashed.stat().st_size
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({
        "benchmark": "checkpoint_manifest", "params": args.params, "file_bytes": size,
        "torch_save_s": round(plain_s, 3), "torch_save_fsync_s": round(synced_s, 3),
        "hashed_save_fsync_s": round(hashed_s, 3), "hash_overhead_vs_fsync": round(hashed_s / synced_s - 1, 3),
        "verify_sizes_s": round(size_check_s, 6),
        "verify_rehash_s": round(rehash_s, 3), "rehash_gb_per_s": round(size / rehash_s / 1e9, 2),
        "machine": platform.machine(), "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
