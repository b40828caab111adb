"""The DeepSpeed engine's settings shared by the training jobs (pre-training, fine-tuning): the learning-rate
schedule of SSLAM_SPEC §10, gradient accumulation from `train.clips_per_update`, the generated DeepSpeed config
with its `train.deepspeed` passthrough and DeepSpeed's own schema check of it, and the per-step seed that makes
masks, noise and augmentation replay exactly on resume."""

from __future__ import annotations

import math

import numpy as np

from jobs.train.config import Config, ConfigError, merge_deepspeed_passthrough


def learning_rate(update: int, peak: float, warmup: int, total: int) -> float:
    """SSLAM_SPEC §10: linear warmup from 0 (update 0 uses lr 0), then one cosine cycle down to 0."""
    if update < warmup:
        return peak * update / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (update - warmup) / (total - warmup))
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


def gradient_accumulation(config: Config, world_size: int) -> int:
    """`train.clips_per_update` (when set) fixes clean clips per update for any GPU count (SSLAM_SPEC §14.6)."""
    train = config.train
    if not train.clips_per_update:
        return train.gradient_accumulation
    per_step = config.data.loader.micro_batch_clips * world_size
    if train.clips_per_update % per_step:
        raise ConfigError(
            f"train.clips_per_update ({train.clips_per_update}) is not a multiple of micro_batch_clips x ranks "
            f"({config.data.loader.micro_batch_clips} x {world_size})"
        )
    return train.clips_per_update // per_step


def deepspeed_config(config: Config, world_size: int) -> dict:
    """The engine's config: what the job derives from its own settings (jobs.train.config.DEEPSPEED_OWNED_KEYS), then
    `train.deepspeed` merged in (communication overlap, bucket sizes, offload, profilers, logging ...)."""
    train = config.train
    accumulation = gradient_accumulation(config, world_size)
    generated = {
        "train_batch_size": config.data.loader.micro_batch_clips * accumulation * world_size,
        "train_micro_batch_size_per_gpu": config.data.loader.micro_batch_clips,
        "gradient_accumulation_steps": accumulation,
        # DeepSpeed >= 0.19.3 defaults to 1.0; the recipe clips at 4.0 (SSLAM_SPEC §10).
        "gradient_clipping": train.gradient_clipping,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        # fairseq's scaler (§10): initial scale 2^7, window 2^14 / GPUs; DeepSpeed's floor is an integer.
        "fp16": {
            "enabled": train.precision == "fp16",
            "initial_scale_power": 7,
            "loss_scale_window": max(1, 2**14 // world_size),
            "min_loss_scale": 1,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return merge_deepspeed_passthrough(generated, train.deepspeed)


def check_deepspeed_accepts(ds_config: dict) -> None:
    """DeepSpeed's own schema check of the merged config, so a misspelt `train.deepspeed` key inside a section
    (DeepSpeed forbids unknown ones) is a ConfigError before the engine is built. Needs the real world size:
    DeepSpeed reads it from the process group."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(ds_config)
    except ValueError as error:  # pydantic's ValidationError included
        raise ConfigError(f"train.deepspeed: DeepSpeed refuses the config: {' '.join(str(error).split())}") from None



def step_seed(seed: int, update: int, micro_step: int, rank: int) -> int:
    """Masks and decoder noise are a function of (seed, update, micro-step, rank): resume replays them exactly."""
    return int(np.random.SeedSequence([seed, update, micro_step, rank]).generate_state(1)[0])

