"""Benchmark of the training step as jobs.pretrain runs it: the DeepSpeed engine (ZeRO stage and precision from
the config, bf16 ZeRO-2 for base_stage2), forward under autocast, engine backward and step (clipping inside),
teacher EMA from the fp32 master weights. One process, one device, several micro-batch sizes and both eager and
compiled blocks in the same run, so the figures sit side by side with benchmarks.vit_reference.

    python -m benchmarks.zero_step --micro-batches 12,24,48 --modes eager,compiled     # base_stage2 on a GPU
    DS_ACCELERATOR=cpu python -m benchmarks.zero_step --tiny --micro-batches 3 --steps 1 --warmup 0

Prints one JSON line per (mode, micro-batch): clips/s, ms/step, peak memory, MFU under
benchmarks.train_step.FLOP_CONVENTION. The micro-batch is fed to the engine as it is (no accumulation), so a
line is one optimizer step of that many clean clips.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys

import torch
import torch.distributed as dist

from benchmarks._common import (
    add_config_arguments, add_sweep_arguments, default_device, load_benchmark_config, peak_flops, peak_memory,
    time_steps,
)  # fmt: skip
from benchmarks.train_step import FLOP_CONVENTION, step_flops, synthetic_batch
from jobs.train.ema import MasterWeightEMA
from jobs.train.engine import deepspeed_config
from model.sslam import SSLAM
from pipeline.mixing import nomix_rows

logger = logging.getLogger("benchmarks.zero_step")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_sweep_arguments(parser, "clean clips per step, e.g. 12,24", "untimed steps first (compilation, allocator)")
    return parser.parse_args(argv)


def init_single_process_group(device: torch.device) -> None:
    """A world of one, as the launcher would set it up (DeepSpeed needs a process group even for one rank)."""
    import deepspeed

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


class EngineStep:
    """The per-update work of jobs.pretrain.Pretrainer.run for one micro-batch per update."""

    def __init__(self, config, device: torch.device) -> None:
        import deepspeed

        train = config.train
        self.model = SSLAM(config.model)
        optimizer = torch.optim.AdamW(
            self.model.param_groups(train.weight_decay, train.weight_decay_mode),
            lr=train.peak_lr, betas=tuple(train.betas), eps=train.eps,
        )  # fmt: skip
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                                    config=deepspeed_config(config, 1))
        self.model.teacher_to(device)
        self.ema = MasterWeightEMA(self.model.encoder, self.model.teacher)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)
        self.device = device
        self.updates = 0
        self.seed = train.seed

    def compile(self) -> None:
        # Every block and teacher pass sees several token counts: static shapes, one graph each.
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = 64
        for block in [*self.model.encoder.blocks, *self.model.teacher.blocks]:
            block.compile()
        self.model.decoder.compile()

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.updates)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss, _, _ = self.engine(batch, generator=generator)
        self.engine.backward(loss)
        self.engine.step()
        self.updates += 1
        self.ema.update(self.model.ema_decay(self.updates))
        return loss.detach()


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args = parse_args(argv)
    config_name, config = load_benchmark_config(args, "train.init_from=", "tracking.enabled=false")
    cfg = config.model
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(config.train.seed)
    init_single_process_group(device)
    rows = nomix_rows(cfg.time_patches, config.data.mixing.nomix_rows)
    peak = peak_flops(device, args.peak_tflops)
    step = EngineStep(config, device)
    records = []
    try:
        for mode in args.modes:
            if mode == "compiled":
                step.compile()
            for clips in args.micro_batches:
                batch = {k: v.to(device) for k, v in
                         synthetic_batch(cfg, clips, config.data.mixing.group_size, rows, clips).items()}
                logger.info("%s %s: %d clean clips, K=%d, device %s", config_name, mode, clips, cfg.clone_batch, device)
                times, loss, _ = time_steps(step, batch, args.steps, args.warmup, device)
                seconds = statistics.median(times)
                flops = step_flops(cfg, clips, rows)
                memory, memory_kind, device_name = peak_memory(device)
                record = {
                    "benchmark": "zero_step",
                    "config": config_name,
                    "stage": cfg.stage,
                    "zero_stage": config.train.zero_stage,
                    "precision": config.train.precision,
                    "mode": mode,
                    "device": device_name,
                    "micro_batch": clips,
                    "clone_batch": cfg.clone_batch,
                    "student_rows": clips * cfg.clone_batch * (2 if cfg.stage == 2 else 1),
                    "steps": args.steps,
                    "ms_per_step": round(seconds * 1e3, 3),
                    "clips_per_s": round(clips / seconds, 3),
                    "peak_memory_bytes": int(memory),
                    "peak_memory_kind": memory_kind,
                    "flops_per_step": flops,
                    "flop_convention": FLOP_CONVENTION,
                    "achieved_tflops": round(flops / seconds / 1e12, 4),
                    "mfu": round(flops / seconds / peak, 4) if peak else None,
                    "final_loss": float("nan") if loss is None else float(loss),
                    "torch": torch.__version__,
                }
                print(json.dumps(record), flush=True)
                records.append(record)
                del batch
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return records


if __name__ == "__main__":
    main()
