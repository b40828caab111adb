"""DeepSpeed fine-tuning entry point: a pre-trained student encoder + classifier head on labelled shards
(SSLAM_SPEC §11).

    sslam finetune --config finetune_as20k --set finetune.source=models:/sslam-encoder@candidate [--ranks N]
    deepspeed jobs/finetune.py --config finetune_as20k [--set k=v ...]

One update: `accumulation` micro-batches per rank (jobs.train.finetune_data.EpochPlan says which clips), each with
batch mixup then SpecAugment on the normalised fbank (model.augment, seeded per (seed, update, micro-step,
rank)), BCE on the soft labels over the label mass, then the optimizer step with layer-wise LR decay groups and
their own cosine schedules (model.finetune). Every `finetune.eval_interval` updates (and at the end) the model
scores `finetune.eval_split` (each rank its share, gathered): mAP goes to metrics.jsonl and MLflow; a new best is
written to `<output_dir>/best/` and registered as a classifier version (jobs.mlops.classifier_registry).

Pre-training's machinery, imported: the run lock, checkpoints with manifests (resume, elastic resume onto
another rank count), StopSignal (SIGTERM/SIGINT checkpoint at the next update and exit 0), the DeepSpeed config
(with `train.deepspeed` passthrough), fail-fast exit and the rank-process end (jobs.train).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from jobs.train import checkpointing
from jobs.mlops.classifier_registry import BEST_DIR, ClassifierTracker, read_best, write_best
from jobs.train.config import Config, ConfigError, dump_yaml
from jobs.train.finetune_data import EpochPlan, label_prior_map, load_split, read_sample_weights
from jobs.train.distributed import any_rank, start_rank
from jobs.train.engine import check_deepspeed_accepts, deepspeed_config, gradient_accumulation, step_seed
from jobs.train.lifecycle import (
    FAILED_EXIT_DEADLINE_S, StopSignal, TrainingStopped, end_rank_process, job_main, run_locked,
)
from jobs.train.resume import resume_folder
from jobs.mlops.tracking import NullTracker
from model.build import build_encoder
from model.checkpoint import CheckpointError, ImportedCheckpoint, load_state_strict
from model.finetune import Augmentation, FinetuneModel, group_learning_rate, layer_decay_groups, set_drop_path

log = logging.getLogger("sslam.finetune")


def source_weights(config: Config):
    """(ImportedCheckpoint of the source's student encoder, its description) from finetune.source."""
    from jobs.export import resolve_source

    source = config.finetune.source
    try:
        exportable = resolve_source(source, trusted=config.finetune.source_trusted)
    except (CheckpointError, OSError, ValueError) as error:
        raise ConfigError(f"finetune.source={source}: {error}") from None
    if exportable.weights.head is not None:
        log.info("finetune.source %s has a classifier head: it is not used, the new head starts fresh", source)
    return exportable.weights, exportable.source


class Finetuner:
    """Engine, data plan, best-mAP memory; `run()` is the loop."""

    def __init__(self, config: Config):
        import deepspeed

        self.config = config
        train, ft = config.train, config.finetune
        self.device = start_rank(config)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(train.seed)

        weights, self.source = source_weights(config)
        self.model_cfg = weights.config
        self.train_set = load_split(config.data, config.data.loader.shards, ft.train_split, cache_dir=ft.cache_dir)
        self.train_frequencies = self.train_set.class_frequencies()
        self.eval_location = ft.eval_shards or config.data.loader.shards
        self.dataset_info = self._dataset_info()
        self._check_shapes()
        encoder = build_encoder(weights, "student").train()
        set_drop_path(encoder, ft.drop_path_rate)
        augmentation = Augmentation(ft.mixup_alpha, ft.mixup_prob, ft.mask_ratio)
        self.model = FinetuneModel(encoder, self.train_set.labels.shape[1], augmentation, ft.pooling)

        self.root = checkpointing.checkpoint_root(train.output_dir)
        resume_tag = resume_folder(config, self.root, self.rank, self.world_size)
        self.saved = checkpointing.read_run_state(resume_tag) if resume_tag is not None else None
        self.elastic = self.saved is not None and (self.world_size, train.zero_stage, train.precision) != (
            self.saved["world_size"], self.saved["zero_stage"], self.saved["precision"])
        if self.elastic:
            load_state_strict(self.model, load_file(str(resume_tag / checkpointing.STUDENT_FILE)),
                              f"fine-tuned model from {resume_tag}")

        self.groups = layer_decay_groups(self.model, train.peak_lr, train.weight_decay, ft.layer_decay,
                                         self.model_cfg.depth, train.weight_decay_mode)
        optimizer = torch.optim.AdamW(self.groups, lr=train.peak_lr, betas=tuple(train.betas), eps=train.eps)
        peaks = [group["lr"] for group in self.groups]

        def schedule(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, [
                (lambda u, p=peak: group_learning_rate(u, p, ft.min_lr, train.warmup_updates, train.max_updates) / p)
                for peak in peaks
            ])

        self.ds_config = deepspeed_config(config, self.world_size)
        check_deepspeed_accepts(self.ds_config)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config)
        self.accumulation = self.engine.gradient_accumulation_steps()
        self.plan = self._plan(gradient_accumulation(config, self.world_size))
        self.total_updates = self.plan.total_updates(train.epochs, train.max_updates)
        self.updates, self.best_map, self.best_update = 0, -math.inf, -1
        if resume_tag is not None:
            self._resume(resume_tag)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)
        output = Path(train.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        self.metrics = open(output / "metrics.jsonl", "a") if self.rank == 0 else None
        self.stop = StopSignal()
        self.preempted = False
        self.tracker = (ClassifierTracker.start(config, self.ds_config, self.dataset_info, self.world_size)
                        if self.rank == 0 and config.tracking.enabled else NullTracker())
        best = read_best(output) if self.best_update >= 0 else None
        if best is not None and best["update"] == self.best_update and hasattr(self.tracker, "remember_best"):
            self.tracker.remember_best(output / BEST_DIR, self.best_update)

    # ---- setup -------------------------------------------------------------------------------------
    def _dataset_info(self) -> dict:
        from pipeline.shardset import read_dataset_info

        try:
            return read_dataset_info(self.config.data.loader.shards)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data.loader.shards={self.config.data.loader.shards}: {error}") from None

    def _check_shapes(self) -> None:
        info, cfg = self.dataset_info, self.model_cfg
        if info.get("mel_bins") != cfg.mel_bins:
            raise ConfigError(f"data.loader.shards has {info.get('mel_bins')} mel bins, the source encoder expects "
                              f"{cfg.mel_bins}")
        frames = self.train_set.fbank.shape[-2]
        if frames % cfg.patch_size or frames // cfg.patch_size > cfg.max_time_patches:
            raise ConfigError(f"clips of {frames} frames do not fit the source encoder (patch {cfg.patch_size}, "
                              f"at most {cfg.max_time_patches} time patches)")

    def _plan(self, accumulation: int) -> EpochPlan:
        ft, micro = self.config.finetune, self.config.data.loader.micro_batch_clips
        weights = None
        if ft.sampling == "weighted":
            weights = read_sample_weights(ft.sample_weights, self.train_set.keys)
        return EpochPlan(len(self.train_set.keys), micro * accumulation * self.world_size, micro, self.world_size,
                         self.config.train.seed, weights, ft.clips_per_epoch)

    def _resume(self, folder: Path) -> None:
        saved = self.saved
        if saved.get("job") != "finetune":
            raise ConfigError(f"train.resume: {folder} is not a fine-tuning checkpoint")
        fingerprint = self.dataset_info.get("fingerprint")
        if saved["dataset_fingerprint"] != fingerprint and not self.config.train.allow_dataset_change:
            raise ConfigError(f"train.resume: {folder} was fine-tuned on dataset fingerprint "
                              f"{saved['dataset_fingerprint']!r}, data.loader.shards has {fingerprint!r}; set "
                              "train.allow_dataset_change=true to continue on the new data")
        if saved["clips_per_update"] != self.plan.clips_per_update:
            raise ConfigError(f"train.resume: {folder} took {saved['clips_per_update']} clips per update, this run "
                              f"takes {self.plan.clips_per_update}; set train.clips_per_update to match")
        if self.elastic:
            checkpointing.restore_optimizer(self.engine, self.scheduler, folder, saved["optimizer"])
        else:
            loaded, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
            if loaded is None:
                raise RuntimeError(f"could not load checkpoint {folder}")
        self.updates, self.best_map, self.best_update = saved["updates"], saved["best_map"], saved["best_update"]
        log.info("resumed from %s at update %d (best mAP %.4f at update %d)", folder, self.updates, self.best_map,
                 self.best_update)

    # ---- one update --------------------------------------------------------------------------------
    def _batch(self, micro_step: int) -> dict:
        rows = self.plan.rows(self.updates, micro_step, self.rank)
        return {"clean": self.train_set.fbank[rows].float().to(self.device),
                "labels": self.train_set.labels[rows].to(self.device)}

    def train_step(self) -> tuple[float, torch.Tensor]:
        """Forward + backward of one update's micro-batches, then the optimizer step: (lr of the x1 groups, loss).
        An fp16 overflow skips the step (DeepSpeed); the update is then retried with the same clips."""
        lr = self.scheduler.get_last_lr()[-1]
        loss = torch.zeros(())
        for micro_step in range(self.accumulation):
            seed = step_seed(self.config.train.seed, self.updates, micro_step, self.rank)
            generator = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)  # drop path draws from the global generator
            batch = self._batch(micro_step)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                loss = self.engine(batch, generator=generator)
            if not bool(torch.isfinite(loss.detach())):
                raise TrainingStopped(f"non-finite loss at update {self.updates} on rank {self.rank}")
            self.engine.backward(loss)
            self.engine.step()
        return lr, loss.detach()

    def _stop_agreed(self) -> bool:
        return any_rank(self.stop.requested is not None, self.device)

    # ---- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """mAP on the eval split (each rank scores its share; all ranks get the result)."""
        import dataclasses

        from jobs.train.metrics import mean_average_precision
        from pipeline.eval_loader import EvalLoader

        ft = self.config.finetune
        data = dataclasses.replace(self.config.data,
                                   loader=dataclasses.replace(self.config.data.loader, shards=self.eval_location))
        try:
            loader = EvalLoader(data, ft.eval_split, self.rank, self.world_size, batch_size=ft.eval_batch_size)
        except (FileNotFoundError, KeyError, ValueError) as error:
            raise ConfigError(f"finetune.eval_split {self.eval_location}:{ft.eval_split}: {error}") from None
        module = self.engine.module
        module.eval()
        labels, scores = [], []
        try:
            for batch in loader:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    logits = module.logits(batch["clean"].to(self.device))
                scores.append(torch.sigmoid(logits.float()).cpu().numpy())
                labels.append(batch["labels"].numpy())
        finally:
            module.train()
        parts = checkpointing.gather_from_ranks((labels, scores))
        all_labels = np.concatenate([x for ranks_labels, _ in parts for x in ranks_labels])
        all_scores = np.concatenate([x for _, ranks_scores in parts for x in ranks_scores])
        value, scored = mean_average_precision(all_labels, all_scores)
        prior = label_prior_map(self.train_frequencies, torch.from_numpy(all_labels))
        return {"mAP": value, "baseline_mAP": prior, "classes_scored": float(scored),
                "eval_clips": float(all_labels.shape[0])}

    def _on_eval(self, metrics: dict[str, float]) -> None:
        improved = metrics["mAP"] > self.best_map
        self._write_metrics({"update": self.updates, **{f"eval_{k}": v for k, v in metrics.items()},
                             "best": improved})
        self.tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, self.updates)
        if not improved:
            return
        self.best_map, self.best_update = metrics["mAP"], self.updates
        state = checkpointing.full_fp32_state(self.engine.module)  # a collective under ZeRO
        if self.rank != 0:
            return
        encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        head = {k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")}
        weights = ImportedCheckpoint(config=self.model_cfg, kind="finetune", student_encoder=encoder, head=head,
                                     num_updates=self.updates)
        record = {"update": self.updates, "metrics": metrics, "classes": self.train_set.classes,
                  "eval_shards": self.eval_location, "eval_split": self.config.finetune.eval_split,
                  "audio": asdict(self.config.data.audio), "pooling": self.config.finetune.pooling,
                  "source": self.source}
        self.tracker.wait_exports()  # the export of the previous best reads the folder write_best replaces
        best = write_best(self.config.train.output_dir, weights, record)
        log.info("update %d: new best eval mAP %.4f (label prior %.4f)", self.updates, metrics["mAP"],
                 metrics["baseline_mAP"])
        if self.config.tracking.register == "every_checkpoint":
            self.tracker.on_checkpoint(best, self.updates)
        elif hasattr(self.tracker, "remember_best"):
            self.tracker.remember_best(best, self.updates)

    # ---- checkpoints and logs ----------------------------------------------------------------------
    def _save(self) -> None:
        run_state = {
            "job": "finetune",
            "updates": self.updates,
            "best_map": self.best_map,
            "best_update": self.best_update,
            "rng": checkpointing.gather_from_ranks(checkpointing.rng_states()),
            "dataset_fingerprint": self.dataset_info.get("fingerprint"),
            "world_size": self.world_size,
            "zero_stage": self.config.train.zero_stage,
            "precision": self.config.train.precision,
            "clips_per_update": self.plan.clips_per_update,
            "source": self.source,
        }
        checkpointing.save(self.engine, self.root, self.updates, run_state, None, dump_yaml(self.config),
                           self.config.train.keep_checkpoints, self.scheduler)

    def _write_metrics(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def run(self) -> int:
        train, ft = self.config.train, self.config.finetune
        saved_at = self.updates if self.saved is not None else -1
        start = time.perf_counter()
        relinked = False
        while self.updates < self.total_updates:
            lr, loss = self.train_step()
            if not self.engine.was_step_applied():
                log.warning("optimizer step skipped (loss-scale overflow) at update %d", self.updates)
                continue
            self.updates += 1
            if not relinked:
                checkpointing.relink_optimizer_states(self.engine)
                relinked = True
            done = self.updates >= self.total_updates
            if self.updates % train.log_interval == 0 or done:
                record = {"update": self.updates, "lr": lr, "loss": float(loss),
                          "epoch": self.plan.epoch_of(self.updates - 1),
                          "updates_per_s": self.updates / max(1e-9, time.perf_counter() - start)}
                self._write_metrics(record)
                self.tracker.log_metrics({k: v for k, v in record.items() if k != "update"}, self.updates)
            if self.updates % ft.eval_interval == 0 or done:
                self._on_eval(self.evaluate())
            stopping = self._stop_agreed()
            if self.updates % train.checkpoint_interval == 0 or done or stopping:
                self._save()
                saved_at = self.updates
            if stopping and not done:
                log.warning("%s: checkpoint written at update %d, exiting",
                            self.stop.requested or "a signal on another rank", self.updates)
                self.preempted = True
                return 0
        if saved_at != self.updates:
            self._save()
        log.info("finished at update %d; best eval mAP %.4f at update %d", self.updates, self.best_map,
                 self.best_update)
        return 0


def check_config(config: Config) -> None:
    """What the config alone can refuse, before any process group or file is touched."""
    ft = config.finetune
    if not ft.source:
        raise ConfigError("finetune.source is empty: name a models:/ URI, a run or checkpoint folder, or a .pt file")
    if ft.sampling == "weighted" and not ft.sample_weights:
        raise ConfigError("finetune.sampling=weighted needs finetune.sample_weights (a weights file)")
    if ft.sampling == "permutation" and (ft.sample_weights or ft.clips_per_epoch):
        raise ConfigError("finetune.sample_weights / clips_per_epoch apply only to finetune.sampling=weighted")


def finetune(config: Config) -> int:
    """One fine-tuning rank in this process; rank 0 holds the run folder's lock (jobs.train.run_lock)."""
    check_config(config)
    return run_locked(config, Finetuner, _close_metrics, lambda trainer: trainer.updates)


def _close_metrics(trainer: Finetuner) -> None:
    if trainer.metrics is not None:
        trainer.metrics.close()


def main(argv: list[str] | None = None, exit_deadline_s: float | None = None) -> int:
    """Exit codes as pre-training's: 0 done or preempted with a checkpoint, 1 failed, 2 config / run folder /
    source refused, 3 a non-finite loss stopped the run."""
    return job_main("SSLAM fine-tuning (run under the deepspeed launcher)", finetune, argv, exit_deadline_s)


if __name__ == "__main__":
    end_rank_process(main(exit_deadline_s=FAILED_EXIT_DEADLINE_S))
