"""Reference for the SSLAM step's figures: a plain PyTorch ViT encoder (torch.nn.TransformerEncoderLayer, pre-LN,
GELU, no dropout) of the model config's width and depth, run on the token counts of one SSLAM stage-2 step.
Forward and backward over the student rows (2B x K sequences of CLS + visible tokens), forward only for the teacher
passes (2B sequences of CLS + all patches, then B partner sequences of CLS + the kept rows). No patch embedding,
decoder, loss, optimizer or EMA: what a transformer of this size achieves on this device, to judge the SSLAM
step's MFU against.

    python -m benchmarks.vit_reference --micro-batches 12,24,48 --modes eager,compiled     # ViT-B on a GPU
    python -m benchmarks.vit_reference --tiny --micro-batches 3 --steps 1 --warmup 0        # CPU, seconds

Prints one JSON line per (mode, micro-batch). FLOPs: the transformer-block part of
benchmarks.train_step.FLOP_CONVENTION (student blocks 3x their forward, teacher blocks 1x).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys

import torch
from torch import nn

from benchmarks._common import (
    add_config_arguments, add_sweep_arguments, default_device, load_benchmark_config, peak_flops, peak_memory,
    time_steps,
)  # fmt: skip
from benchmarks.train_step import encoder_pass_flops
from model.config import ModelConfig
from model.masking import mask_counts
from pipeline.mixing import nomix_rows

logger = logging.getLogger("benchmarks.vit_reference")


def token_counts(cfg: ModelConfig, clips: int, rows: int) -> dict[str, tuple[int, int]]:
    """(sequences, tokens per sequence, CLS included) of each pass of one stage-2 step of `clips` clean clips."""
    _, n_keep = mask_counts(cfg.num_patches, cfg)
    return {
        "student": (2 * clips * cfg.clone_batch, 1 + n_keep),
        "teacher": (2 * clips, 1 + cfg.num_patches),
        "partner_teacher": (clips, 1 + (cfg.time_patches - 2 * rows) * cfg.freq_patches),
    }


def plain_vit(cfg: ModelConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        cfg.embed_dim, cfg.num_heads, dim_feedforward=int(cfg.embed_dim * cfg.mlp_ratio), dropout=0.0,
        activation="gelu", batch_first=True, norm_first=True,
    )  # fmt: skip
    return nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)


class ReferenceStep:
    def __init__(self, cfg: ModelConfig, device: torch.device, use_autocast: bool) -> None:
        self.student = plain_vit(cfg).to(device)
        self.teacher = plain_vit(cfg).to(device).requires_grad_(False)
        self.device, self.use_autocast = device, use_autocast

    def compile(self) -> None:
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = 64
        for layer in [*self.student.layers, *self.teacher.layers]:
            layer.compile()

    def __call__(self, inputs: dict[str, torch.Tensor]) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_autocast):
            with torch.no_grad():
                self.teacher(inputs["teacher"])
                self.teacher(inputs["partner_teacher"])
            out = self.student(inputs["student"])
        out.float().square().mean().backward()
        self.student.zero_grad(set_to_none=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, config_help="job config whose model sizes to use")
    add_sweep_arguments(parser, "clean clips, e.g. 12,24,48", "untimed steps first")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args = parse_args(argv)
    config_name, config = load_benchmark_config(args)
    cfg = config.model
    device = default_device()
    use_autocast = device.type == "cuda"
    torch.manual_seed(0)
    rows = nomix_rows(cfg.time_patches, config.data.mixing.nomix_rows)
    peak = peak_flops(device, args.peak_tflops)
    step = ReferenceStep(cfg, device, use_autocast)
    records = []
    for mode in args.modes:
        if mode == "compiled":
            step.compile()
        for clips in args.micro_batches:
            counts = token_counts(cfg, clips, rows)
            inputs = {name: torch.randn(sequences, tokens, cfg.embed_dim, device=device)
                      for name, (sequences, tokens) in counts.items()}
            inputs["student"].requires_grad_(True)
            times, _, _ = time_steps(step, inputs, args.steps, args.warmup, device)
            seconds = statistics.median(times)
            flops = 3 * encoder_pass_flops(cfg, *counts["student"]) + encoder_pass_flops(cfg, *counts["teacher"])
            flops += encoder_pass_flops(cfg, *counts["partner_teacher"])
            memory, memory_kind, device_name = peak_memory(device)
            record = {
                "benchmark": "vit_reference",
                "config": config_name,
                "mode": mode,
                "device": device_name,
                "dtype": "bf16 autocast" if use_autocast else "fp32",
                "micro_batch": clips,
                "passes": {name: {"sequences": s, "tokens": t} for name, (s, t) in counts.items()},
                "steps": args.steps,
                "ms_per_step": round(seconds * 1e3, 3),
                "clips_per_s": round(clips / seconds, 3),
                "peak_memory_bytes": int(memory),
                "peak_memory_kind": memory_kind,
                "flops_per_step": flops,
                "achieved_tflops": round(flops / seconds / 1e12, 4),
                "mfu": round(flops / seconds / peak, 4) if peak else None,
                "torch": torch.__version__,
            }
            print(json.dumps(record), flush=True)
            records.append(record)
            del inputs
    return records


if __name__ == "__main__":
    main()
