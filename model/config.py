"""Typed configuration of the SSLAM model: encoder, masking, decoder, targets, EMA and losses.

Defaults are the paper's ViT-B recipe (SSLAM_SPEC §2-§9); tiny configs override sizes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    # Input: raw fbank (T, F); the encoder normalises with (x - mean) / (2 * std) (§1.9, §14.8).
    target_length: int = 1024
    mel_bins: int = 128
    norm_mean: float = -4.268
    norm_std: float = 4.569

    # Encoder (§2, §3).
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    # Rows of time patches in the fixed positional table (768 * 16 frames = 122.9 s).
    max_time_patches: int = 768

    # Masking (§4).
    clone_batch: int = 16
    mask_prob: float = 0.8
    mask_prob_adjust: float = 0.07
    mask_length: int = 5

    # Decoder (§5).
    decoder_dim: int = 768
    decoder_layers: int = 6
    decoder_groups: int = 16
    decoder_kernel: int = 3
    mask_noise_std: float = 0.01

    # Targets (§7); 0 means all layers.
    average_top_k_layers: int = 0

    # EMA teacher (§6).
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100000

    # Losses (§8, §9.4).
    stage: int = 1  # 1 = EAT, 2 = SSLAM
    cls_loss_weight: float = 1.0
    mix_loss_weight: float = 2.0

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
        if self.stage not in (1, 2):
            raise ValueError(f"model.stage must be 1 or 2, got {self.stage}")
        if not 1 <= self.top_k_layers <= self.depth:
            raise ValueError("model.average_top_k_layers must be in [0, depth]")
        if self.time_patches > self.max_time_patches:
            raise ValueError("model.target_length exceeds the positional table (model.max_time_patches)")
