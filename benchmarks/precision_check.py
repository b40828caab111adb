"""bf16 against fp32 on one batch: the same SSLAM weights, batch and masks (same generator seed), the loss and
its parts once in fp32 and once under bf16 autocast (what jobs.pretrain runs on a GPU), and the relative
difference of the total loss. A large difference means a part of the model loses too much in bf16.

    python -m benchmarks.precision_check                      # base_stage2 (ViT-B), 12 clips, on the GPU
    python -m benchmarks.precision_check --tiny --clips 3     # CPU (bf16 autocast exists on the CPU too)

Prints one JSON line; exits 1 when the relative difference exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from benchmarks._common import add_config_arguments, default_device, load_benchmark_config
from benchmarks.train_step import synthetic_batch
from model.sslam import SSLAM
from pipeline.mixing import nomix_rows

logger = logging.getLogger("benchmarks.precision_check")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--clips", type=int, default=12, help="clean clips in the batch")
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest accepted |bf16 - fp32| / |fp32|")
    return parser.parse_args(argv)


def loss_of(model: SSLAM, batch: dict, seed: int, device: torch.device, bf16: bool) -> tuple[float, dict]:
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, parts, _ = model(batch, torch.Generator().manual_seed(seed))
    return float(loss), {name: float(value) for name, value in parts.items()}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args = parse_args(argv)
    config_name, config = load_benchmark_config(args)
    cfg = config.model
    device = default_device()
    torch.manual_seed(config.train.seed)
    model = SSLAM(config.model).to(device)
    model.teacher_to(device)
    model.eval()  # no dropout: the two passes differ by precision alone
    rows = nomix_rows(cfg.time_patches, config.data.mixing.nomix_rows)
    batch = {k: v.to(device) for k, v in
             synthetic_batch(cfg, args.clips, config.data.mixing.group_size, rows, 0).items()}
    fp32, fp32_parts = loss_of(model, batch, config.train.seed, device, bf16=False)
    bf16, bf16_parts = loss_of(model, batch, config.train.seed, device, bf16=True)
    relative = abs(bf16 - fp32) / max(abs(fp32), 1e-12)
    record = {
        "benchmark": "precision_check",
        "config": config_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "clips": args.clips,
        "loss_fp32": fp32,
        "loss_bf16": bf16,
        "loss_parts_fp32": fp32_parts,
        "loss_parts_bf16": bf16_parts,
        "relative_difference": relative,
        "tolerance": args.tolerance,
        "ok": relative <= args.tolerance,
        "torch": torch.__version__,
    }
    print(json.dumps(record), flush=True)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
