"""Benchmark of one full SSLAM training step: student forward and backward, AdamW step with gradient
clipping, EMA teacher update (both teacher passes included in the forward). Plain PyTorch on one device,
no DeepSpeed, so it measures the model's compute and memory, not the engine's communication.

    python -m benchmarks.train_step                  # base_stage2: ViT-B 1024 x 128, 12 clean clips, K = 8
    python -m benchmarks.train_step --tiny           # tiny_stage2 on the CPU (seconds)
    python -m benchmarks.train_step --tiny --compile # what `train.compile: true` compiles (SSLAM.compile_blocks)

Prints one JSON line: clean clips/s, ms/step, peak memory, FLOPs per step and MFU with the FLOP
convention stated in the record, device, dtype, whether the step was compiled and how long the untimed
warm-up steps took (compilation included). bf16 autocast on CUDA, fp32 on the CPU. Run it with and without
`--compile` to compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys

import numpy as np
import torch

from benchmarks._common import add_config_arguments, load_benchmark_config, peak_flops, peak_memory, time_steps
from jobs.train.config import Config
from jobs.train.ema import MasterWeightEMA
from model.config import ModelConfig
from model.masking import mask_counts
from model.sslam import SSLAM
from pipeline.mixing import draw_windows_batch, group_cycle, logmel_max_batch, nomix_rows

logger = logging.getLogger("benchmarks.train_step")

FLOP_CONVENTION = (
    "2 FLOPs per multiply-add of matmuls and convolutions only (norms, softmax, elementwise, loss, "
    "optimizer and EMA ignored); student ops (patch embed, pre-LN blocks on [CLS + visible] tokens, decoder "
    "convs and projection, 2B*K rows in stage 2) count 3x their forward (forward + backward); teacher "
    "forward passes count 1x (stage 2: 2B clips x (1 + N) tokens, then B partners x (1 + (Tp - 2r) Fp) "
    "tokens); per block and token 2 * (4 D^2 + 2 D H_mlp) for the linears, plus 4 n D per token for "
    "attention scores and values"
)


def encoder_pass_flops(cfg: ModelConfig, sequences: int, tokens: int) -> float:
    """Matmul FLOPs of the transformer blocks over `sequences` rows of `tokens` tokens (CLS included)."""
    dim, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    linear = 2 * (4 * dim * dim + 2 * dim * hidden) * tokens
    attention = 4 * tokens * tokens * dim
    return float(sequences * cfg.depth * (linear + attention))


def patch_embed_flops(cfg: ModelConfig, clips: int) -> float:
    return float(2 * clips * cfg.num_patches * cfg.embed_dim * cfg.patch_size**2)


def decoder_flops(cfg: ModelConfig, rows: int) -> float:
    dim = cfg.decoder_dim
    conv = 2 * dim * (dim // cfg.decoder_groups) * cfg.decoder_kernel**2 * cfg.decoder_layers
    linear = 2 * dim * cfg.embed_dim * (2 if dim != cfg.embed_dim else 1)
    return float(rows * cfg.num_patches * (conv + linear))


def step_flops(cfg: ModelConfig, clean_clips: int, nomix_row_count: int) -> float:
    """FLOPs of one training step under FLOP_CONVENTION."""
    student_clips = clean_clips * (2 if cfg.stage == 2 else 1)
    rows = student_clips * cfg.clone_batch
    _, n_keep = mask_counts(cfg.num_patches, cfg)
    student = patch_embed_flops(cfg, student_clips) + encoder_pass_flops(cfg, rows, 1 + n_keep)
    student += decoder_flops(cfg, rows)
    teacher = patch_embed_flops(cfg, student_clips) + encoder_pass_flops(cfg, student_clips, 1 + cfg.num_patches)
    if cfg.stage == 2:
        kept_tokens = (cfg.time_patches - 2 * nomix_row_count) * cfg.freq_patches
        teacher += encoder_pass_flops(cfg, clean_clips, 1 + kept_tokens)
    return 3 * student + teacher


def synthetic_batch(cfg: ModelConfig, clips: int, group_size: int, rows: int, seed: int) -> dict[str, torch.Tensor]:
    """Raw-fbank-like clips in mixture groups, with seeded no-mix windows and log-mel max mixtures."""
    if clips % group_size:
        raise ValueError(f"--clips ({clips}) must be a multiple of the mixture group size ({group_size})")
    generator = torch.Generator().manual_seed(seed)
    clean = cfg.norm_mean + cfg.norm_std * torch.randn(clips, 1, cfg.target_length, cfg.mel_bins, generator=generator)
    cycle = torch.tensor(group_cycle(group_size))
    partner = (torch.arange(clips) // group_size) * group_size + cycle.repeat(clips // group_size)
    i1, i2 = draw_windows_batch(cfg.time_patches, rows, np.random.default_rng(seed), clips)
    nomix = torch.zeros(clips, cfg.time_patches, dtype=torch.bool)
    for clip, (start1, start2) in enumerate(zip(i1.tolist(), i2.tolist())):
        nomix[clip, start1 : start1 + rows] = True
        nomix[clip, start2 : start2 + rows] = True
    mixed = logmel_max_batch(clean, partner, nomix, cfg.patch_size)
    return {"clean": clean, "mixed": mixed, "partner": partner, "nomix": nomix}


class TrainStep:
    """Forward, backward, clip, AdamW step, EMA update: the per-update work of jobs.pretrain."""

    def __init__(self, config: Config, device: torch.device, use_autocast: bool) -> None:
        train = config.train
        self.model = SSLAM(config.model).to(device)
        self.model.teacher_to(device)
        if train.compile:
            self.model.compile_blocks()
        self.ema = MasterWeightEMA(self.model.encoder, self.model.teacher)
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(train.weight_decay, train.weight_decay_mode),
            lr=train.peak_lr, betas=tuple(train.betas), eps=train.eps,
        )  # fmt: skip
        self.clip = train.gradient_clipping
        self.device = device
        self.use_autocast = use_autocast
        self.generator = torch.Generator(device=device).manual_seed(train.seed)
        self.updates = 0

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_autocast):
            loss, _, _ = self.model(batch, self.generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.ema.update(self.model.ema_decay(self.updates))
        return loss.detach()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--clips", type=int, default=0, help="clean clips per step (default: the loader's)")
    parser.add_argument("--clone", type=int, default=0, help="clone_batch K (default: the model config's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--compile", action="store_true", help="compile as train.compile does (same as --set train.compile=true)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: by GPU name)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args = parse_args(argv)
    overrides = [f"model.clone_batch={args.clone}"] if args.clone else []
    overrides += ["train.compile=true"] if args.compile else []
    config_name, config = load_benchmark_config(args, *overrides)
    cfg = config.model
    clips = args.clips or config.data.loader.micro_batch_clips
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    use_autocast = device.type == "cuda"
    torch.manual_seed(config.train.seed)

    rows = nomix_rows(cfg.time_patches, config.data.mixing.nomix_rows)
    batch = {k: v.to(device) for k, v in synthetic_batch(cfg, clips, config.data.mixing.group_size, rows, 0).items()}
    step = TrainStep(config, device, use_autocast)
    logger.info("%s: stage %d, %d clean clips, K=%d, device %s", config_name, cfg.stage, clips, cfg.clone_batch, device)

    times, loss, warmup_seconds = time_steps(step, batch, args.steps, args.warmup, device)

    seconds = statistics.median(times)
    flops = step_flops(cfg, clips, rows)
    peak = peak_flops(device, args.peak_tflops)
    memory, memory_kind, device_name = peak_memory(device)
    record = {
        "benchmark": "train_step",
        "config": config_name,
        "stage": cfg.stage,
        "device": device_name,
        "dtype": "bf16 autocast, fp32 master weights and teacher" if use_autocast else "fp32",
        "compile": config.train.compile,
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_seconds, 3),
        "clean_clips": clips,
        "clone_batch": cfg.clone_batch,
        "student_rows": clips * cfg.clone_batch * (2 if cfg.stage == 2 else 1),
        "steps": args.steps,
        "ms_per_step": round(seconds * 1e3, 3),
        "ms_per_step_mean": round(statistics.fmean(times) * 1e3, 3),
        "clips_per_s": round(clips / seconds, 3),
        "peak_memory_bytes": int(memory),
        "peak_memory_kind": memory_kind,
        "flops_per_step": flops,
        "flop_convention": FLOP_CONVENTION,
        "achieved_tflops": round(flops / seconds / 1e12, 4),
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": round(flops / seconds / peak, 4) if peak else None,
        "final_loss": float(loss),
        "torch": torch.__version__,
    }
    if not math.isfinite(record["final_loss"]):
        logger.warning("the loss is not finite")
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
