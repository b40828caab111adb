"""The fine-tuned classifier as the fine-tuning job trains it (SSLAM_SPEC §11): encoder + fc_norm/linear head,
per-block drop path, layer-wise learning-rate decay groups, the per-group cosine schedule and the loss.

`FinetuneModel` keeps the state-dict layout of model.features.EncoderWithHead (`encoder.*`, `classifier.*`), so
its weights export as a "finetune" ImportedCheckpoint with the classifier's keys as the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.augment import batch_mixup, spec_augment
from model.encoder import Encoder
from model.features import ClassifierHead, pool_tokens


def set_drop_path(encoder: Encoder, rate: float) -> list[float]:
    """Block i gets linspace(0, rate, depth)[i]; returns the rates."""
    rates = torch.linspace(0.0, rate, len(encoder.blocks)).tolist() if rate else [0.0] * len(encoder.blocks)
    for block, block_rate in zip(encoder.blocks, rates):
        block.drop_path = float(block_rate)
    return rates


def layer_scale(name: str, depth: int, decay: float) -> float:
    """Learning-rate factor of a parameter: decay^(depth - i) inside encoder block i, 1 elsewhere (patch conv,
    CLS, pre-LN, fc_norm, head)."""
    prefix = "encoder.blocks."
    if name.startswith(prefix):
        return decay ** (depth - int(name[len(prefix):].split(".", 1)[0]))
    return 1.0


def layer_decay_groups(
    model: nn.Module, peak_lr: float, weight_decay: float, decay: float, depth: int,
    mode: Literal["all", "exclude_norm_bias"] = "all",
) -> list[dict]:
    """One optimizer group per (learning-rate factor, weight decay): `lr` is peak x factor, `lr_scale` the
    factor. Weight decay as in pre-training (`all`: every tensor, the reference's effective behaviour)."""
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = layer_scale(name, depth, decay)
        exempt = mode == "exclude_norm_bias" and (param.ndim <= 1 or name.endswith(".bias"))
        wd = 0.0 if exempt else weight_decay
        group = groups.setdefault((scale, wd), {"params": [], "lr": peak_lr * scale, "lr_scale": scale,
                                                 "weight_decay": wd})
        group["params"].append(param)
    return sorted(groups.values(), key=lambda group: group["lr_scale"])


def group_learning_rate(update: int, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """fairseq's cosine schedule of one group: a peak below `min_lr` is constant; otherwise linear warmup from
    min_lr (fairseq's warmup_init_lr default) to the peak over `warmup` updates, then one cosine to min_lr."""
    if peak <= min_lr:
        return peak
    if update < warmup:
        return min_lr + (peak - min_lr) * update / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (update - warmup) / (total - warmup))
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def soft_label_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of per-class BCE-with-logits over batch and classes, divided by the label mass (the reference's
    sample_size = labels.sum())."""
    total = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum")
    return total / labels.sum().clamp_min(1e-6)


@dataclass
class Augmentation:
    mixup_alpha: float = 0.8
    mixup_prob: float = 0.9
    mask_ratio: float = 0.2  # SpecAugment: mask params = ratio x mel bins, ratio x target length


class FinetuneModel(nn.Module):
    """Raw fbank -> logits; in training mode `forward(batch)` augments (mixup, SpecAugment, in the normalised
    domain) and returns the loss."""

    def __init__(self, encoder: Encoder, num_classes: int, augmentation: Augmentation,
                 pooling: Literal["cls", "mean"] = "cls") -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = ClassifierHead(encoder.cfg.embed_dim, num_classes)
        self.augmentation = augmentation
        self.pooling = pooling

    def logits_of_normalized(self, x: Tensor) -> Tensor:
        hidden, _ = self.encoder.contextualize(self.encoder.embed_normalized(x), return_ffn=False)
        return self.classifier(pool_tokens(hidden, self.pooling))

    def logits(self, fbank: Tensor) -> Tensor:
        """Raw fbank (B, 1, T, F) -> logits (B, C), no augmentation."""
        return self.logits_of_normalized(self.encoder.normalize(fbank.float()))

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The training loss of a batch {clean (B, 1, T, F) raw fbank, labels (B, C)}."""
        aug = self.augmentation
        x = self.encoder.normalize(batch["clean"].float())
        x, labels, _ = batch_mixup(x, batch["labels"].float(), aug.mixup_alpha, aug.mixup_prob, generator)
        if aug.mask_ratio > 0:
            cfg = self.encoder.cfg
            x = spec_augment(x, aug.mask_ratio * cfg.mel_bins, aug.mask_ratio * x.shape[-2], generator)
        return soft_label_bce(self.logits_of_normalized(x), labels)
