"""Typed configuration of the SSLAM model: encoder, masking, decoder, targets, EMA and losses.

Defaults are the paper's ViT-B recipe (SSLAM_SPEC §2-§9); tiny configs override sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """Enum fields are `Literal`s and numeric bounds are field metadata (`ge`, `gt`, `le`, `lt`), checked by
    `jobs.train.config` at load; `validate()` checks what relates several fields."""

    # Input: raw fbank (T, F); the encoder normalises with (x - mean) / (2 * std) (§1.9, §14.8).
    target_length: int = field(default=1024, metadata={"ge": 1})
    mel_bins: int = field(default=128, metadata={"ge": 1})
    norm_mean: float = -4.268
    norm_std: float = field(default=4.569, metadata={"gt": 0})

    # Encoder (§2, §3).
    patch_size: int = field(default=16, metadata={"ge": 1})
    embed_dim: int = field(default=768, metadata={"ge": 1})
    depth: int = field(default=12, metadata={"ge": 1})
    num_heads: int = field(default=12, metadata={"ge": 1})
    mlp_ratio: float = field(default=4.0, metadata={"gt": 0})
    norm_eps: float = field(default=1e-6, metadata={"gt": 0})
    # Rows of time patches in the fixed positional table (768 * 16 frames = 122.9 s).
    max_time_patches: int = field(default=768, metadata={"ge": 1})

    # Masking (§4).
    clone_batch: int = field(default=16, metadata={"ge": 1})
    mask_prob: float = field(default=0.8, metadata={"ge": 0, "lt": 1})
    mask_prob_adjust: float = field(default=0.07, metadata={"ge": 0, "lt": 1})
    mask_length: int = field(default=5, metadata={"ge": 1})

    # Decoder (§5).
    decoder_dim: int = field(default=768, metadata={"ge": 1})
    decoder_layers: int = field(default=6, metadata={"ge": 1})
    decoder_groups: int = field(default=16, metadata={"ge": 1})
    decoder_kernel: int = field(default=3, metadata={"ge": 1})  # odd (same padding)
    mask_noise_std: float = field(default=0.01, metadata={"ge": 0})

    # Targets (§7); 0 means all layers.
    average_top_k_layers: int = field(default=0, metadata={"ge": 0})

    # EMA teacher (§6).
    ema_decay: float = field(default=0.9998, metadata={"ge": 0, "le": 1})
    ema_end_decay: float = field(default=0.99999, metadata={"ge": 0, "le": 1})
    ema_anneal_end_step: int = field(default=100000, metadata={"ge": 0})

    # Losses (§8, §9.4).
    stage: Literal[1, 2] = 1  # 1 = EAT, 2 = SSLAM
    cls_loss_weight: float = field(default=1.0, metadata={"ge": 0})
    mix_loss_weight: float = field(default=2.0, metadata={"ge": 0})
    # "reference": padding tokens count like content; "aware": tokens that are entirely padding (batch key
    # `valid_frames`, model/padding.py) are left out of the targets' statistics, the losses and S.
    padding: Literal["reference", "aware"] = "reference"
    # The utterance (CLS) target's per-layer normalisation before the mean over (content) tokens:
    # "instance_norm" is the reference's (the patch target's IN per clip and channel, whose token mean is ~0,
    # so the target is nearly the same for every clip); "layer_norm" normalises each token over D instead and
    # keeps what the clip's tokens share (model/targets.py, utterance_target).
    utterance_norm: Literal["instance_norm", "layer_norm"] = "instance_norm"
    # Then, across the rows of the batch per dimension (the rank's micro-batch under data parallel; in stage 2
    # clean and mixture rows together): "none" (the reference's) or "batch", which subtracts the batch mean
    # (DINO-style centring: the CLS must encode what differs between clips; model/targets.py,
    # center_utterance_targets); or "running", which subtracts a running mean of those batch means with
    # `utterance_center_momentum` (DINO's centre; per rank, saved in each checkpoint: model/utterance_centre.py).
    utterance_center: Literal["none", "batch", "running"] = "none"
    utterance_center_momentum: float = field(default=0.9, metadata={"ge": 0, "lt": 1})

    @property
    def time_patches(self) -> int:
        return self.target_length // self.patch_size

    @property
    def freq_patches(self) -> int:
        return self.mel_bins // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.time_patches * self.freq_patches

    @property
    def top_k_layers(self) -> int:
        return self.average_top_k_layers or self.depth

    def validate(self) -> None:
        if self.target_length % self.patch_size or self.mel_bins % self.patch_size:
            raise ValueError(
                f"model.target_length ({self.target_length}) and model.mel_bins ({self.mel_bins}) "
                f"must be multiples of model.patch_size ({self.patch_size})"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"model.embed_dim ({self.embed_dim}) must divide by model.num_heads ({self.num_heads})")
        if self.decoder_dim % self.decoder_groups:
            raise ValueError("model.decoder_dim must divide by model.decoder_groups")
        if self.decoder_kernel % 2 == 0:
            raise ValueError(f"model.decoder_kernel must be odd (same padding), got {self.decoder_kernel}")
        if self.padding not in ("reference", "aware"):
            raise ValueError(f"model.padding must be 'reference' or 'aware', got {self.padding!r}")
        if self.stage not in (1, 2):
            raise ValueError(f"model.stage must be 1 or 2, got {self.stage}")
        if not 1 <= self.top_k_layers <= self.depth:
            raise ValueError("model.average_top_k_layers must be in [0, depth]")
        if self.time_patches > self.max_time_patches:
            raise ValueError("model.target_length exceeds the positional table (model.max_time_patches)")
