"""Host syncs and collectives per optimizer update of the training loop, before and after the per-update
`train_step` (jobs.pretrain), on 2 CPU ranks under the real `deepspeed` launcher.

    python benchmarks/loop_syncs.py                      # both: the loop of commit eb6f289 and this checkout
    python benchmarks/loop_syncs.py --updates 41 --accumulation 8

Counted: calls of torch.distributed collectives and of the Tensor methods that read a value on the host
(item, tolist, __bool__, __float__, __int__), split into those the loop's own code issues (the frame that
calls them is in the pretrain module) and the rest (DeepSpeed's gradient reduction, the EMA, the model).
On a GPU every host read of a device value stalls the host until the device has caught up. The window runs
from the 2nd to the last applied update (log intervals included, the final checkpoint not). Prints one JSON
line: per update, for each loop, {loop: {collectives, host_syncs}, other: {...}}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "eb6f289"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "reduce_scatter", "reduce_scatter_tensor", "reduce")
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


class Counts:
    """Counters of collectives and host reads, keyed by (kind, issued by the loop). The wrappers are installed
    once and count into the active Counts: DeepSpeed keeps references to collectives it looked up at init."""

    active: "Counts | None" = None

    def __init__(self, loop_file: str):
        self.loop_file, self.counts, self.snapshots = loop_file, Counter(), []

    def _caller_is_loop(self) -> bool:
        frame = sys._getframe(3)
        while frame is not None and "torch/distributed" in frame.f_code.co_filename:
            frame = frame.f_back
        return frame is not None and frame.f_code.co_filename == self.loop_file

    @staticmethod
    def install(owner, name: str, kind: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            Counts.count(kind)
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    @staticmethod
    def count(kind: str) -> None:
        counts = Counts.active
        if counts is not None:
            counts.counts[kind, counts._caller_is_loop()] += 1

    def snapshot(self) -> None:
        self.snapshots.append(Counter(self.counts))

    def per_update(self) -> dict:
        first, last = self.snapshots[1], self.snapshots[-1]
        updates = len(self.snapshots) - 2
        delta = {key: (last[key] - first[key]) / updates for key in set(first) | set(last)}
        return {
            where: {"collectives": round(delta.get(("collective", own), 0.0), 3),
                    "host_syncs": round(delta.get(("host_sync", own), 0.0), 3)}
            for where, own in (("loop", True), ("other", False))
        }


def _module(which: str):
    if which == "after":
        import jobs.pretrain

        return jobs.pretrain
    source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:jobs/pretrain.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "pretrain_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("pretrain_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    from jobs.train.config import load_config
    from jobs.train.ema import MasterWeightEMA

    for name in COLLECTIVES:
        if hasattr(dist, name):
            Counts.install(dist, name, "collective")
    for name in HOST_READS:
        Counts.install(torch.Tensor, name, "host_sync")
    original_update = MasterWeightEMA.update

    def update(self, decay):
        Counts.active.snapshot()
        return original_update(self, decay)

    MasterWeightEMA.update = update
    results = {}
    for which in ("before", "after"):
        module = _module(which)
        Counts.active = counts = Counts(module.__file__)
        config = load_config("tiny_stage1", [
            f"data.loader.shards={args.shards}", f"train.output_dir={args.out}/{which}", "data.loader.num_workers=0",
            "tracking.enabled=false", "data.audio.target_length=128", "data.audio.mel_bins=32",
            "model.target_length=128", "model.mel_bins=32", f"train.max_updates={args.updates}",
            f"train.gradient_accumulation={args.accumulation}", "train.log_interval=5",
            "train.checkpoint_interval=100000",
        ])
        module.train(config)
        Counts.active = None
        results[which] = counts.per_update()
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=21)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--verbose", action="store_true", help="show the ranks' output")
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args)
        return
    sys.path.insert(0, str(REPO / "tests"))
    from shardsets import write_training_set

    with tempfile.TemporaryDirectory() as work:
        shards = Path(work) / "shards"
        write_training_set(shards, target_length=128, mel_bins=32, num_shards=2, groups_per_shard=96)
        result = Path(work) / "result.json"
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        launcher = Path(sys.executable).parent / "deepspeed"
        subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 2000),
                        __file__, "--rank", "--shards", str(shards), "--out", f"{work}/runs", "--result", str(result),
                        "--updates", str(args.updates), "--accumulation", str(args.accumulation)],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=None if args.verbose else subprocess.DEVNULL)
        record = json.loads(result.read_text())
    print(json.dumps({"benchmark": "loop_syncs", "ranks": 2, "device": "cpu", "gradient_accumulation": args.accumulation,
                      "log_interval": 5, "per_update": record, "before": BEFORE_COMMIT}))


if __name__ == "__main__":
    main()
