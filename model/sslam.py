"""SSLAM pre-training model: the student (encoder + decoder), the fp32 EMA teacher kept outside the
module tree, and the stage-1 (EAT, SSLAM_SPEC §8) and stage-2 (SSLAM, §9, §14.1-14.2) losses.

Only the student is an nn.Module submodule, so a training engine (DeepSpeed) wraps, casts and
shards the student alone. The teacher is an fp32 `Encoder` held in the instance dict: move it with
`teacher_to(device)`; the training job updates it (jobs.train.ema.MasterWeightEMA) with decay `ema_decay(u)`
after each applied optimizer step.

With `model.padding: aware` the batch also carries `valid_frames` (N,) and the padding rule of
model/padding.py applies: padding frames are reset to 0 (in `clean` and in `mixed`, a mixture lasting as
long as its primary), and tokens that are entirely padding are left out of the teacher's instance norm, of
the CLS targets' mean, of the patch losses and of S, and of attention (student and teacher). Masks keep the
reference's visible count per row (§4) but apply the mask ratio to each clip's content
(masking.content_block_masks); a masked padding token is not scored. With `reference` none of this runs.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import Tensor, nn

from model.config import ModelConfig
from model.decoder import Decoder, decoder_input
from model.encoder import Encoder
from model.masking import block_masks, content_block_masks, split_indices
from model.padding import check_valid_frames, content_tokens, zero_padding
from model.utterance_centre import UtteranceCentre
from model.targets import (
    cls_target,
    drop_time_rows,
    make_targets,
    source_retention_target,
    utterance_target,
)

WeightDecayMode = Literal["all", "exclude_norm_bias"]


def std_across_rows(values: Tensor) -> Tensor:
    """Per-dimension std across all rows of (..., D), averaged over D (the reference's target/pred var)."""
    flat = values.detach().float().reshape(-1, values.shape[-1])
    return torch.sqrt(flat.var(dim=0) + 1e-6).mean()


class SSLAM(nn.Module):
    """forward(batch) -> (loss, parts, stats) with loss = Σraw / S, S = masked tokens in the micro-batch
    (masked content tokens with `model.padding: aware`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.make_teacher()
        # Not a buffer: the student's state dict (DeepSpeed's, the export's) stays the encoder's and decoder's.
        self.utterance_centre = UtteranceCentre(cfg.utterance_center, cfg.utterance_center_momentum)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SSLAM:
        return cls(cfg)

    # ----------------------------------------------------------------------------------------------
    # Teacher
    # ----------------------------------------------------------------------------------------------

    @property
    def teacher(self) -> Encoder:
        return self.__dict__["_teacher"]

    def make_teacher(self) -> Encoder:
        """(Re)build the teacher as an fp32, frozen, eval-mode copy of the current student encoder."""
        teacher = copy.deepcopy(self.encoder).float()
        teacher.requires_grad_(False)
        teacher.eval()
        self.__dict__["_teacher"] = teacher
        return teacher

    def teacher_to(self, device: torch.device | str) -> Encoder:
        """Move the teacher (not reached by .to() on this module), keeping it fp32."""
        return self.teacher.to(device=device, dtype=torch.float32)

    def ema_decay(self, updates: int) -> float:
        """d(u): linear from ema_decay at u = 0 to ema_end_decay at ema_anneal_end_step, then constant (§6)."""
        cfg = self.cfg
        if updates >= cfg.ema_anneal_end_step:
            return cfg.ema_end_decay
        remaining = 1.0 - updates / cfg.ema_anneal_end_step
        return cfg.ema_end_decay - (cfg.ema_end_decay - cfg.ema_decay) * remaining

    def compile_blocks(self) -> None:
        """torch.compile, in place, the student's transformer blocks and decoder and the teacher's blocks: the
        dense compute of both forwards. `nn.Module.compile` keeps parameter names and state dicts, so an engine's
        wrapping, checkpoints and the EMA see the same module. Masking, gathers and losses stay eager."""
        for module in [*self.encoder.blocks, self.decoder, *self.teacher.blocks]:
            module.compile()

    # ----------------------------------------------------------------------------------------------
    # Optimizer groups
    # ----------------------------------------------------------------------------------------------

    def param_groups(self, weight_decay: float, mode: WeightDecayMode = "all") -> list[dict]:
        """Student parameter groups: `all` decays every trainable tensor (the reference's effective
        behaviour, §10); `exclude_norm_bias` exempts 1-D tensors and biases (the data2vec intent, §14.5)."""
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        if mode == "all":
            return [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
        if mode == "exclude_norm_bias":
            exempt = [p for name, p in trainable if p.ndim <= 1 or name.endswith(".bias")]
            decayed = [p for name, p in trainable if not (p.ndim <= 1 or name.endswith(".bias"))]
            groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
            return [group for group in groups if group["params"]]
        raise ValueError(f"weight decay mode must be 'all' or 'exclude_norm_bias', got {mode!r}")

    # ----------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------

    def forward(
        self, batch: dict[str, Tensor], generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor | float | int]]:
        """One micro-batch: batch = {clean (N, 1, T, F) raw fbank; stage 2 also mixed, partner, nomix; with
        `model.padding: aware` also valid_frames (N,) long}. Masks come from `generator` (CPU is fine);
        without one, a seed is drawn from the global RNG."""
        if "clean" not in batch:
            raise KeyError("training batch lacks 'clean'")
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        teacher_device = next(self.teacher.parameters()).device
        if teacher_device != batch["clean"].device:
            raise RuntimeError(
                f"teacher is on {teacher_device} but the batch on {batch['clean'].device}: call teacher_to(device)"
            )
        valid = self._valid_frames(batch) if self.cfg.padding == "aware" else None
        if valid is not None:
            batch = {**batch, "clean": zero_padding(batch["clean"], valid)}
            if "mixed" in batch:
                batch["mixed"] = zero_padding(batch["mixed"], valid)
        if self.cfg.stage == 1:
            return self._forward_stage1(batch["clean"], generator, valid)
        return self._forward_stage2(batch, generator, valid)

    def _valid_frames(self, batch: dict[str, Tensor]) -> Tensor:
        if "valid_frames" not in batch:
            raise KeyError("model.padding=aware needs the batch key 'valid_frames' (pipeline.loader writes it)")
        clean = batch["clean"]
        valid = batch["valid_frames"].to(clean.device)
        check_valid_frames(valid, clean.shape[0], clean.shape[-2])
        return valid

    def _content(self, valid: Tensor | None, grid: tuple[int, int]) -> Tensor | None:
        """bool (N, Tp * Fp) content tokens, or None in reference mode."""
        return None if valid is None else content_tokens(valid, *grid, self.cfg.patch_size)

    def _masks(self, num_clips: int, grid: tuple[int, int], generator: torch.Generator, device: torch.device,
               valid: Tensor | None = None):
        """(ids_keep, ids_masked, ids_restore) for num_clips * K rows, on `device`; with `valid` (aware mode)
        the mask ratio applies to each clip's content (masking.content_block_masks)."""
        rows = num_clips * self.cfg.clone_batch
        if valid is None:
            mask = block_masks(rows, *grid, self.cfg, generator)
        else:
            content_rows = (valid.to(generator.device) + self.cfg.patch_size - 1) // self.cfg.patch_size
            content_rows = content_rows.repeat_interleave(self.cfg.clone_batch)
            mask = content_block_masks(content_rows, *grid, self.cfg, generator)
        return tuple(ids.to(device, non_blocking=True) for ids in split_indices(mask))

    def _student(self, clips: Tensor, ids_keep: Tensor, ids_restore: Tensor, grid: tuple[int, int],
                 content: Tensor | None = None):
        """Student on K masked clones per clip: (predictions (R, N, D), CLS outputs (R, D)), R = clips * K.
        With `content` (clips, N) its visible padding tokens are left out of attention."""
        tokens = self.encoder.embed(clips)
        clip_of_row = self._clip_of_row(ids_keep.shape[0], tokens.device)
        visible = tokens[clip_of_row[:, None], ids_keep]
        visible_content = None if content is None else content[clip_of_row[:, None], ids_keep]
        hidden, _ = self.encoder.contextualize(visible, return_ffn=False, content=visible_content)
        predictions = self.decoder(decoder_input(hidden[:, 1:], ids_restore, self.cfg.mask_noise_std), *grid)
        return predictions, hidden[:, 0]

    def _clip_of_row(self, rows: int, device: torch.device) -> Tensor:
        return torch.arange(rows, device=device) // self.cfg.clone_batch

    def _token_loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """ℓ(a, b) = Σ_d (a_d - b_d)^2 / sqrt(D) in fp32, over the last axis."""
        return (predictions.float() - targets).pow(2).sum(dim=-1) / math.sqrt(predictions.shape[-1])

    def _patch_sum(self, predictions: Tensor, targets: Tensor, scored: Tensor | None) -> Tensor:
        """Σ ℓ over the masked positions (R, m), or over those where `scored` (R, m) is True."""
        losses = self._token_loss(predictions, targets)
        return losses.sum() if scored is None else losses.masked_fill(~scored, 0.0).sum()

    def _scored(self, content: Tensor | None, ids_masked: Tensor, clip_of_row: Tensor) -> tuple[Tensor | None, int]:
        """(masked positions that are content (R, m) or None, S): S counts them (all masked positions in reference
        mode); at least 1, which only a row of padding alone could undercut."""
        if content is None:
            return None, ids_masked.numel()
        scored = self._masked(content, ids_masked, clip_of_row)
        return scored, max(int(scored.sum()), 1)

    def _masked(self, values: Tensor, ids_masked: Tensor, clip_of_row: Tensor | None = None) -> Tensor:
        """Values at each row's masked positions: (R, m, D). With clip_of_row, `values` is per clip."""
        if clip_of_row is None:
            index = ids_masked.unsqueeze(-1).expand(-1, -1, values.shape[-1])
            return torch.gather(values, 1, index)
        return values[clip_of_row[:, None], ids_masked]

    def _stats(self, predictions: Tensor, targets: Tensor, ids_keep: Tensor, ids_restore: Tensor, sample_size: int,
               scored: Tensor | None = None):
        if scored is not None:
            predictions, targets = predictions[scored], targets[scored]
        return {
            "target_var": std_across_rows(targets),
            "pred_var": std_across_rows(predictions),
            "masked_pct": 1.0 - ids_keep.shape[1] / ids_restore.shape[1],
            "sample_size": sample_size,
        }

    def _utterance_targets(self, ffn_outputs: list[Tensor], top_k: int, patch_targets: Tensor | None,
                           content: Tensor | None) -> Tensor:
        """CLS targets (b, D) from the last top_k layers: the token mean of make_targets (reusing
        `patch_targets` when they are those, stage 1) or, with `model.utterance_norm: layer_norm`,
        targets.utterance_target; then centred with `model.utterance_center` (model/utterance_centre.py; a
        running centre moves in training mode only)."""
        if self.cfg.utterance_norm == "layer_norm":
            targets = utterance_target(ffn_outputs, top_k, content)
        else:
            if patch_targets is None:
                patch_targets = make_targets(ffn_outputs, top_k, content)
            targets = cls_target(patch_targets, content)
        return self.utterance_centre(targets, update=self.training)

    def _forward_stage1(self, clean: Tensor, generator: torch.Generator, valid: Tensor | None = None):
        """EAT (§8): L = Σ_masked ℓ(Ŷ, Y) / S + w_cls Σ_rows ℓ(ĉ, c), c = mean_n Y."""
        grid = self.encoder.grid(clean)
        content = self._content(valid, grid)
        ids_keep, ids_masked, ids_restore = self._masks(clean.shape[0], grid, generator, clean.device, valid)
        predictions, cls_predictions = self._student(clean, ids_keep, ids_restore, grid, content)

        with torch.no_grad():
            _, ffn_outputs = self.teacher(clean.float(), content=content)
            ffn_outputs = [f[:, 1:] for f in ffn_outputs]
            patch_targets = make_targets(ffn_outputs, self.cfg.top_k_layers, content)
            utterance_targets = self._utterance_targets(ffn_outputs, self.cfg.top_k_layers, patch_targets, content)
            del ffn_outputs

        clip_of_row = self._clip_of_row(ids_masked.shape[0], clean.device)
        scored, sample_size = self._scored(content, ids_masked, clip_of_row)
        masked_predictions = self._masked(predictions, ids_masked)
        masked_targets = self._masked(patch_targets, ids_masked, clip_of_row)
        patch = self._patch_sum(masked_predictions, masked_targets, scored) / sample_size
        cls = self.cfg.cls_loss_weight * self._token_loss(cls_predictions, utterance_targets[clip_of_row]).sum()
        loss = patch + cls
        parts = {"eat_patch": patch.detach(), "eat_cls": cls.detach()}
        return loss, parts, self._stats(masked_predictions, masked_targets, ids_keep, ids_restore, sample_size, scored)

    def _check_stage2_batch(self, batch: dict[str, Tensor], time_patches: int) -> None:
        missing = [key for key in ("mixed", "partner", "nomix") if key not in batch]
        if missing:
            raise KeyError(f"stage-2 batch lacks {missing}")
        clean, mixed, partner, nomix = batch["clean"], batch["mixed"], batch["partner"], batch["nomix"]
        num_clips = clean.shape[0]
        if mixed.shape != clean.shape:
            raise ValueError(f"mixed {tuple(mixed.shape)} does not match clean {tuple(clean.shape)}")
        if partner.shape != (num_clips,) or partner.dtype != torch.long:
            raise ValueError(
                f"partner must be a long ({num_clips},) tensor, got {partner.dtype} {tuple(partner.shape)}"
            )
        if bool(((partner < 0) | (partner >= num_clips)).any()):
            raise ValueError(f"partner indices must lie in [0, {num_clips})")
        if nomix.shape != (num_clips, time_patches) or nomix.dtype != torch.bool:
            raise ValueError(
                f"nomix must be a bool ({num_clips}, {time_patches}) tensor, got {nomix.dtype} {tuple(nomix.shape)}"
            )

    def _forward_stage2(self, batch: dict[str, Tensor], generator: torch.Generator, valid: Tensor | None = None):
        """SSLAM (§9.4): eat_patch over all rows, mix_weight x source retention over mixture rows (same S),
        w_cls x Σ_rows ℓ(ĉ, c) with the last-layer CLS target."""
        clean = batch["clean"]
        grid = self.encoder.grid(clean)
        self._check_stage2_batch(batch, grid[0])
        partner, nomix = batch["partner"].to(clean.device), batch["nomix"].to(clean.device)
        num_clips = clean.shape[0]
        content = self._content(valid, grid)
        # A mixture row's content is its primary's; the partner's, row-aligned, decides where it is present.
        row_content = None if content is None else torch.cat([content, content])
        partner_content = None if content is None else content[partner]
        clean_ids = self._masks(num_clips, grid, generator, clean.device, valid)
        ids_keep, ids_masked, ids_restore = (torch.cat([ids, ids]) for ids in clean_ids)
        clips = torch.cat([clean, batch["mixed"]])
        predictions, cls_predictions = self._student(clips, ids_keep, ids_restore, grid, row_content)

        with torch.no_grad():
            tokens = self.teacher.embed(clips.float())
            _, ffn_outputs = self.teacher.contextualize(tokens, content=row_content)
            ffn_outputs = [f[:, 1:] for f in ffn_outputs]
            patch_targets = make_targets(ffn_outputs, self.cfg.top_k_layers, row_content)
            utterance_targets = self._utterance_targets(ffn_outputs, 1, None, row_content)
            del ffn_outputs
            partner_tokens = drop_time_rows(tokens[:num_clips][partner], nomix, grid[1])
            kept_partner_content = None
            if partner_content is not None:
                kept_partner_content = drop_time_rows(partner_content.unsqueeze(-1), nomix, grid[1]).squeeze(-1)
            _, partner_ffn = self.teacher.contextualize(partner_tokens, content=kept_partner_content)
            partner_targets = make_targets(
                [f[:, 1:] for f in partner_ffn], self.cfg.top_k_layers, kept_partner_content
            )
            del partner_ffn
            retention_targets = source_retention_target(
                patch_targets[:num_clips], partner_targets, nomix, grid[1], partner_content
            )

        rows = ids_masked.shape[0]
        clean_rows = rows // 2
        clip_of_row = self._clip_of_row(rows, clean.device)
        scored, sample_size = self._scored(row_content, ids_masked, clip_of_row)
        masked_predictions = self._masked(predictions, ids_masked)
        masked_targets = self._masked(patch_targets, ids_masked, clip_of_row)
        eat_patch = self._patch_sum(masked_predictions, masked_targets, scored) / sample_size
        masked_retention = self._masked(retention_targets, ids_masked[clean_rows:], clip_of_row[:clean_rows])
        mixture_scored = None if scored is None else scored[clean_rows:]
        mix_patch = (
            self.cfg.mix_loss_weight
            * self._patch_sum(masked_predictions[clean_rows:], masked_retention, mixture_scored)
            / sample_size
        )
        eat_cls = self.cfg.cls_loss_weight * self._token_loss(cls_predictions, utterance_targets[clip_of_row]).sum()
        loss = eat_patch + mix_patch + eat_cls
        parts = {"eat_patch": eat_patch.detach(), "mix_patch": mix_patch.detach(), "eat_cls": eat_cls.detach()}
        return loss, parts, self._stats(masked_predictions, masked_targets, ids_keep, ids_restore, sample_size, scored)
