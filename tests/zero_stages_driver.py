"""Run under the deepspeed launcher by tests/test_pretrain_launch.py: one launch trains, for each ZeRO stage
in --zero, stage 1 from scratch and then stage 2 initialised from it, with the same seed and data.

    deepspeed --num_gpus 2 tests/zero_stages_driver.py --shards DIR --out DIR --zero 1 2 3
"""

from __future__ import annotations

import argparse
import logging

import torch.distributed as dist

from jobs.train.config import load_config
from jobs.pretrain import train
from jobs.train.lifecycle import end_rank_process


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--stage1-updates", type=int, default=16)
    parser.add_argument("--stage2-updates", type=int, default=8)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # A fast EMA so the teacher moves far from its start and a wrong partition update would show.
    common = [f"data.loader.shards={args.shards}", "data.loader.num_workers=0", "train.log_interval=4",
              "model.ema_decay=0.9", "model.ema_end_decay=0.99", "model.ema_anneal_end_step=100",
              "tracking.enabled=false"]
    try:
        for zero in args.zero:
            stage1 = f"{args.out}/zero{zero}/stage1"
            config = load_config(
                "tiny_stage1",
                common + [f"train.zero_stage={zero}", f"train.output_dir={stage1}",
                          f"train.max_updates={args.stage1_updates}", "train.checkpoint_interval=1000"],
            )
            train(config)
            config = load_config(
                "tiny_stage2",
                common + [f"train.zero_stage={zero}", f"train.output_dir={args.out}/zero{zero}/stage2",
                          f"train.init_from={stage1}", f"train.max_updates={args.stage2_updates}",
                          "train.checkpoint_interval=1000"],
            )
            train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    end_rank_process(main())
