"""DeepSpeed pre-training entry point: stage 1 (EAT) and stage 2 (SSLAM) are the same job, different configs.

    deepspeed [--hostfile H] jobs/pretrain.py --config base_stage2 [--set k=v ...]
    sslam pretrain --config tiny_stage1            # one machine: launches `deepspeed` for you

The DeepSpeed engine wraps the student (encoder + decoder). The teacher is an fp32 encoder on every rank,
updated from the fp32 master weights after every applied optimizer step (jobs.ema). One loop:
batch -> forward -> backward -> step -> EMA -> logs -> checkpoint (SSLAM_SPEC §10, DESIGN.md).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from jobs import checkpointing
from jobs.config import Config, ConfigError, add_config_arguments, config_from_args, dump_yaml, merge_deepspeed_passthrough
from jobs.ema import MasterWeightEMA
from jobs.tracking import NullTracker, Tracker
from model.checkpoint import CheckpointError
from model.sslam import SSLAM

log = logging.getLogger("sslam.pretrain")


class TrainingStopped(RuntimeError):
    """A guard stopped the run (collapse, non-finite loss): the message says why."""


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
    """The engine's config: what the job derives from its own settings (jobs.config.DEEPSPEED_OWNED_KEYS), then
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


def check_dataset(info: dict, config: Config, time_patches: int) -> None:
    """Refuse a dataset whose shapes or mixture layout do not match the config, before any step."""
    from pipeline.mixing import nomix_rows

    expected = {
        "target_length": config.data.audio.target_length,
        "mel_bins": config.data.audio.mel_bins,
        "group_size": config.data.mixing.group_size,
        "r": nomix_rows(time_patches, config.data.mixing.nomix_rows),
    }
    wrong = {k: (info.get(k), v) for k, v in expected.items() if info.get(k) != v}
    if config.train.dataset_fingerprint and info.get("fingerprint") != config.train.dataset_fingerprint:
        wrong["fingerprint"] = (info.get("fingerprint"), config.train.dataset_fingerprint)
    if wrong:
        details = ", ".join(f"{k}: dataset {got!r} != config {want!r}" for k, (got, want) in wrong.items())
        raise ConfigError(f"dataset.json does not match the config ({details})")


def step_seed(seed: int, update: int, micro_step: int, rank: int) -> int:
    """Masks and decoder noise are a function of (seed, update, micro-step, rank): resume replays them exactly."""
    return int(np.random.SeedSequence([seed, update, micro_step, rank]).generate_state(1)[0])


@dataclass
class RunState:
    updates: int = 0
    epoch: int = 0
    micro_steps: int = 0  # micro-steps of the current update
    loader_positions: list = field(default_factory=list)


class RunTrace:
    """`metrics.jsonl` (rank 0: update, lr used, EMA decay, loss) and, with `train.record_samples`,
    `samples_rank{r}.jsonl` (the sample keys each rank consumed per update): what resume tests compare."""

    def __init__(self, output_dir: Path, rank: int, record_samples: bool):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(output_dir / "metrics.jsonl", "a") if rank == 0 else None
        self.samples = open(output_dir / f"samples_rank{rank}.jsonl", "a") if record_samples else None

    def record_update(self, update: int, lr: float, ema_decay: float, loss: float) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps({"update": update, "lr": lr, "ema_decay": ema_decay, "loss": loss}) + "\n")
            self.metrics.flush()

    def record_keys(self, update: int, keys: list[str]) -> None:
        if self.samples is not None:
            self.samples.write(json.dumps({"update": update, "keys": keys}) + "\n")
            self.samples.flush()

    def close(self) -> None:
        for handle in (self.metrics, self.samples):
            if handle is not None:
                handle.close()


class StopSignal:
    """SIGTERM (preemption) sets a flag; the loop checkpoints and exits 0 at the next step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def _any_rank(flags: list[float], device) -> list[bool]:
    """Max over ranks of a few flags in one all-reduce (stop, exhausted, non-finite)."""
    tensor = torch.tensor(flags, dtype=torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


class Pretrainer:
    """Holds the engine, the teacher EMA, the loader and the run state; `run()` is the training loop."""

    def __init__(self, config: Config):
        import deepspeed

        self.config = config
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=config.train.collective_timeout_s),
        )
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(config.train.seed)

        self.dataset_info = self._read_dataset_info()
        check_dataset(self.dataset_info, config, config.model.time_patches)

        self.model = SSLAM(config.model)
        # Checkpoints are written only here; a resume may read from another run (train.resume=<path>).
        self.root = checkpointing.checkpoint_root(config.train.output_dir)
        resume_tag = self._resume_tag()
        self.saved, self.elastic = None, False
        if resume_tag is not None:
            self.saved = self._check_resume(resume_tag)
        elif config.train.init_from:
            self._initialise_from(config.train.init_from)
        groups = self.model.param_groups(config.train.weight_decay, config.train.weight_decay_mode)
        optimizer = torch.optim.AdamW(
            groups, lr=config.train.peak_lr, betas=tuple(config.train.betas), eps=config.train.eps
        )
        train = config.train

        def schedule(opt):
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda u: learning_rate(u, 1.0, train.warmup_updates, train.max_updates)
            )

        self.ds_config = deepspeed_config(config, self.world_size)
        check_deepspeed_accepts(self.ds_config)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config
        )
        self.model.teacher_to(self.device)
        if train.compile:
            self.model.compile_blocks()
        self.ema = MasterWeightEMA(self.model.encoder, self.model.teacher)
        self.state = RunState()
        if resume_tag is not None:
            self._resume(resume_tag)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)
        self.stop = StopSignal()
        self.trace = RunTrace(Path(train.output_dir), self.rank, train.record_samples)
        self.preempted = False
        # Rank 0 alone talks to MLflow, on a background thread (jobs.tracking).
        self.tracker = (
            Tracker.start(config, self.ds_config, self.dataset_info, self.world_size)
            if self.rank == 0 and config.tracking.enabled
            else NullTracker()
        )

    # ---- setup -------------------------------------------------------------------------------------
    def _read_dataset_info(self) -> dict:
        from pipeline.loader import read_dataset_info

        try:
            return read_dataset_info(self.config.data.loader.shards)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data.loader.shards={self.config.data.loader.shards}: {error}") from None

    def _resume_tag(self) -> Path | None:
        """The checkpoint folder to continue from: train.resume=auto takes this run's newest complete one,
        a path names a tag folder (which must be complete) or a run / checkpoints folder (its newest complete)."""
        resume = self.config.train.resume
        if resume == "never":
            return None
        if resume == "auto":
            return self._on_rank0(lambda: self._newest_complete(self.root, "train.resume", missing_ok=True))
        path = Path(resume)
        if checkpointing.TAG_PATTERN.match(path.name) and path.is_dir():
            problem = self._on_rank0(lambda: checkpointing.verify(path, self.config.train.verify_checkpoint_checksums))
            if problem is not None:
                raise ConfigError(f"train.resume={resume}: the checkpoint is not complete ({problem})")
            return path
        if path.is_dir():
            root = checkpointing.checkpoint_root(path) if (path / "checkpoints").is_dir() else path
            return self._on_rank0(lambda: self._newest_complete(root, "train.resume"))
        raise ConfigError(f"train.resume: no checkpoint folder {resume}")

    def _on_rank0(self, decide):
        """Rank 0 decides (reading the checkpoint folders once), every rank gets its answer or its ConfigError."""
        answer = [None]
        if self.rank == 0:
            try:
                answer = [("ok", decide())]
            except (ConfigError, OSError) as error:  # the other ranks are waiting in the broadcast
                answer = [("error", str(error))]
        if dist.is_initialized() and self.world_size > 1:
            dist.broadcast_object_list(answer, src=0)
        kind, value = answer[0]
        if kind == "error":
            raise ConfigError(value)
        return value

    def _newest_complete(self, root: Path, key: str, missing_ok: bool = False) -> Path | None:
        choice = checkpointing.latest_complete(root, self.config.train.verify_checkpoint_checksums)
        for tag, reason in choice.skipped:
            log.warning("%s: skipping checkpoint %s: %s", key, root / tag, reason)
        if choice.folder is None and not missing_ok:
            reasons = "; ".join(f"{tag}: {reason}" for tag, reason in choice.skipped)
            raise ConfigError(f"{key}: no checkpoint under {root}" + (f" is complete ({reasons})" if reasons else ""))
        if choice.folder is not None and choice.skipped:
            log.warning("%s: continuing from the newest complete checkpoint %s", key, choice.folder)
        return choice.folder

    def _check_resume(self, folder: Path) -> dict:
        """Before the engine exists: the checkpoint's run state, checked against this run's data and layout.
        Another rank count, ZeRO stage or precision takes the elastic path: the model starts from the saved
        fp32 weights and `_resume` restores the optimizer from the full moments."""
        from pipeline.loader import resume_positions

        train, loader = self.config.train, self.config.data.loader
        try:
            saved = checkpointing.read_run_state(folder)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"train.resume: {folder} has no readable {checkpointing.RUN_STATE_FILE} ({error})"
            ) from None
        fingerprint = self.dataset_info.get("fingerprint")
        positions = saved["loader_positions"]
        if saved["dataset_fingerprint"] != fingerprint:
            if not train.allow_dataset_change:
                raise ConfigError(
                    f"train.resume: the checkpoint {folder} was trained on dataset fingerprint "
                    f"{saved['dataset_fingerprint']!r} but data.loader.shards={loader.shards} has {fingerprint!r}; "
                    "set train.allow_dataset_change=true to continue on the new data"
                )
            log.warning(
                "dataset fingerprint %r differs from the checkpoint's %r (train.allow_dataset_change): the saved "
                "loader position does not apply, epoch %d starts from its beginning",
                fingerprint, saved["dataset_fingerprint"], saved["epoch"],
            )
            positions = []
        layout = (self.world_size, train.zero_stage, train.precision)
        self.elastic = layout != (saved["world_size"], saved["zero_stage"], saved["precision"])
        if self.world_size != saved["world_size"]:
            context = (f"train.resume: {folder} took {saved['clips_per_update']} clean clips per update on "
                       f"{saved['world_size']} ranks, this run has {self.world_size}")
            try:
                accumulation = gradient_accumulation(self.config, self.world_size)
            except ConfigError as error:
                raise ConfigError(f"{context}: {error}") from None
            clips = loader.micro_batch_clips * accumulation * self.world_size
            if clips != saved["clips_per_update"]:
                raise ConfigError(
                    f"{context}: an update would take {clips} (micro_batch_clips {loader.micro_batch_clips} x "
                    f"accumulation {accumulation} x {self.world_size} ranks); set train.clips_per_update="
                    f"{saved['clips_per_update']} with a rank count that divides it"
                )
        saved["loader_positions"] = resume_positions(positions, self.world_size, loader.num_workers)
        if self.elastic:
            from model.checkpoint import load_state_strict

            student = load_file(str(folder / checkpointing.STUDENT_FILE))
            load_state_strict(self.model, student, f"student from {folder}")
        return saved

    def _initialise_from(self, source: str) -> None:
        """Stage 2 starts from a stage-1 run of ours or an official EAT checkpoint; everything else resets (§10)."""
        from model.checkpoint import import_official, load_into_sslam, load_state_strict

        path = Path(source)
        if path.is_file():
            load_into_sslam(self.model, import_official(path, trusted=self.config.train.init_from_trusted))
            log.info("initialised student and teacher from the official checkpoint %s", path)
            return
        if checkpointing.TAG_PATTERN.match(path.name):
            problem = self._on_rank0(lambda: checkpointing.verify(path, self.config.train.verify_checkpoint_checksums))
            if problem is not None:
                raise ConfigError(f"train.init_from={source}: the checkpoint is not complete ({problem})")
            folder = path
        else:
            root = checkpointing.checkpoint_root(path) if (path / "checkpoints").is_dir() else path
            folder = self._on_rank0(lambda: self._newest_complete(root, "train.init_from"))
        try:
            student, teacher = checkpointing.load_initialisation(folder)
        except FileNotFoundError as error:
            raise ConfigError(f"train.init_from: {error}") from None
        load_state_strict(self.model, student, f"student from {folder}")
        load_state_strict(self.model.teacher, teacher, f"teacher from {folder}")
        log.info("initialised student and teacher from %s", folder)

    def _resume(self, folder: Path) -> None:
        saved = self.saved
        if self.elastic:
            checkpointing.restore_optimizer(self.engine, self.scheduler, folder, saved["optimizer"])
        else:
            loaded, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
            if loaded is None:
                raise RuntimeError(f"could not load checkpoint {folder}")
        from model.checkpoint import load_state_strict

        teacher = load_file(str(folder / checkpointing.TEACHER_FILE))
        teacher = {k: v.to(self.device) for k, v in teacher.items()}
        load_state_strict(self.model.teacher, teacher, f"teacher from {folder}")
        self.state = RunState(
            updates=saved["updates"], epoch=saved["epoch"], loader_positions=saved["loader_positions"]
        )
        # Masks and noise are seeded per (seed, update, micro-step, rank); a rank the checkpoint did not have
        # starts its global generators from (seed, update, rank).
        if self.rank < len(saved["rng"]):
            checkpointing.restore_rng_states(saved["rng"][self.rank])
        else:
            fresh = step_seed(self.config.train.seed, self.state.updates, 0, self.rank)
            torch.manual_seed(fresh)
            np.random.seed(fresh % 2**32)
            random.seed(fresh)
        how = (f"; elastically: {saved['world_size']} -> {self.world_size} ranks, ZeRO {saved['zero_stage']} -> "
               f"{self.config.train.zero_stage}, {saved['precision']} -> {self.config.train.precision}"
               if self.elastic else "")
        log.info("resumed from %s at update %d (epoch %d) of %s%s", folder.name, self.state.updates,
                 self.state.epoch, folder.parent, how)

    # ---- loop --------------------------------------------------------------------------------------
    def _loader(self, epoch: int, position: dict | None):
        from pipeline.loader import TrainLoader

        return TrainLoader(
            self.config.data,
            split=self.config.data.loader.split,
            rank=self.rank,
            world_size=self.world_size,
            epoch=epoch,
            start_position=position,
        )

    def _forward_backward(self, batch: dict) -> tuple[torch.Tensor, dict, dict, bool]:
        seed = step_seed(self.config.train.seed, self.state.updates, self.state.micro_steps, self.rank)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            loss, parts, stats = self.engine(batch, generator=generator)
        finite = bool(torch.isfinite(loss.detach()).item())
        return loss, parts, stats, finite

    def _check_guards(self, stats: dict) -> None:
        train = self.config.train
        target_var, pred_var = float(stats["target_var"]), float(stats["pred_var"])
        if train.min_target_var and target_var < train.min_target_var:
            raise TrainingStopped(
                f"collapse guard: target variance {target_var:.3g} < train.min_target_var {train.min_target_var} "
                f"at update {self.state.updates}"
            )
        if train.min_pred_var and pred_var < train.min_pred_var:
            raise TrainingStopped(
                f"collapse guard: prediction variance {pred_var:.3g} < train.min_pred_var {train.min_pred_var} "
                f"at update {self.state.updates}"
            )

    def _save(self, loader) -> None:
        position = loader.state_dict() if loader is not None else None
        run_state = {
            "updates": self.state.updates,
            "epoch": self.state.epoch,
            "loader_positions": checkpointing.gather_from_ranks(position),
            "rng": checkpointing.gather_from_ranks(checkpointing.rng_states()),
            "dataset_fingerprint": self.dataset_info.get("fingerprint"),
            "world_size": self.world_size,
            "zero_stage": self.config.train.zero_stage,
            "precision": self.config.train.precision,
            "clips_per_update": self.ds_config["train_batch_size"],
        }
        checkpointing.save(
            self.engine, self.root, self.state.updates, run_state, self.model.teacher, dump_yaml(self.config),
            self.config.train.keep_checkpoints, self.scheduler,
        )
        self.tracker.on_checkpoint(self.root / checkpointing.tag_for(self.state.updates), self.state.updates)

    def run(self) -> int:
        train = self.config.train
        meter = {"start": time.perf_counter(), "wait": 0.0, "clips": 0}
        saved_at = self.state.updates if self.state.updates else -1  # a resumed run's checkpoint exists already
        loader = None
        while self.state.updates < train.max_updates and (not train.epochs or self.state.epoch < train.epochs):
            position = self.state.loader_positions[self.rank] if self.state.loader_positions else None
            loader = self._loader(self.state.epoch, position)
            batches = iter(loader)
            while self.state.updates < train.max_updates:
                (stop,) = _any_rank([float(self.stop.requested)], self.device)
                # Only between updates (no half-accumulated gradients to lose) and before fetching (the saved
                # loader position has not consumed a batch), so a resume replays exactly.
                if stop and self.state.micro_steps == 0:
                    log.warning("SIGTERM: writing a checkpoint at update %d, then exiting", self.state.updates)
                    self._save(loader)
                    self.preempted = True
                    return 0
                fetch_start = time.perf_counter()
                batch = next(batches, None)
                meter["wait"] += time.perf_counter() - fetch_start
                (exhausted,) = _any_rank([float(batch is None)], self.device)
                if exhausted:
                    break
                if self.state.updates == 0 and self.state.micro_steps == 0:
                    self.tracker.log_preview(batch)
                lr = self.scheduler.get_last_lr()[0]
                loss, parts, stats, finite = self._forward_backward(batch)
                (nonfinite,) = _any_rank([float(not finite)], self.device)
                if nonfinite:
                    message = (
                        f"non-finite loss at update {self.state.updates} (this rank's loss finite: {finite}); "
                        f"sample keys on rank {self.rank}: {loader.last_keys}"
                    )
                    if train.on_nonfinite_loss == "stop":
                        raise TrainingStopped(message)
                    log.error("%s: skipping the micro-batch on every rank", message)
                    continue
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.engine.backward(loss)
                self.engine.step()
                meter["clips"] += batch["clean"].shape[0]
                self.state.micro_steps += 1
                self.trace.record_keys(self.state.updates, loader.last_keys)
                if not boundary:
                    continue
                self.state.micro_steps = 0
                if not self.engine.was_step_applied():
                    log.warning("optimizer step skipped (loss-scale overflow) at update %d", self.state.updates)
                    continue
                self.state.updates += 1
                decay = self.model.ema_decay(self.state.updates)
                self.ema.update(decay)
                self._check_guards(stats)
                self.trace.record_update(self.state.updates, lr, decay, float(loss.detach()))
                if self.state.updates % train.log_interval == 0 or self.state.updates == train.max_updates:
                    self._log(loss, parts, stats, meter)
                    meter = {"start": time.perf_counter(), "wait": 0.0, "clips": 0}
                if self.state.updates % train.checkpoint_interval == 0:
                    self._save(loader)
                    saved_at = self.state.updates
            if self.rank == 0 and loader.dropped_samples:
                log.info(
                    "epoch %d: dropped a tail of %d samples so every rank serves the same number of batches",
                    self.state.epoch, loader.dropped_samples,
                )
            if self.state.updates < train.max_updates:
                self.state.epoch += 1
                self.state.loader_positions = []
        if saved_at != self.state.updates:
            self._save(loader if self.state.updates < train.max_updates else None)
        log.info("finished at update %d (epoch %d)", self.state.updates, self.state.epoch)
        return 0

    def _log(self, loss, parts, stats, meter) -> None:
        elapsed = max(1e-9, time.perf_counter() - meter["start"])
        metrics = {
            "loss": float(loss.detach()),
            **{f"loss_{k}": float(v) for k, v in parts.items()},
            "lr": self.scheduler.get_last_lr()[0],
            "ema_decay": self.model.ema_decay(self.state.updates),
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "clips_per_s": meter["clips"] * self.world_size / elapsed,
            "data_wait_fraction": meter["wait"] / elapsed,
            "target_var": float(stats["target_var"]),
            "pred_var": float(stats["pred_var"]),
        }
        if self.rank == 0:
            log.info("update %d %s", self.state.updates, " ".join(f"{k}={v:.5g}" for k, v in metrics.items()))
            self.tracker.log_metrics(metrics, self.state.updates)

def train(config: Config) -> int:
    """Run one pre-training job in this process (one rank); the process group stays up for the caller."""
    trainer = Pretrainer(config)
    status = "FAILED"
    try:
        code = trainer.run()
        status = "KILLED" if trainer.preempted else "FINISHED"
        return code
    finally:
        trainer.trace.close()
        trainer.tracker.finish(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SSLAM pre-training (run under the deepspeed launcher)", allow_abbrev=False)
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (train.resume=auto)")
    args = parser.parse_args(argv)
    # A rank that dies inside native code (gloo, NCCL, a DeepSpeed op) prints the Python stack of every thread.
    faulthandler.enable()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank{os.environ.get('RANK', 0)} %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
        if args.resume:
            config.train.resume = "auto"
        return train(config)
    except (ConfigError, CheckpointError) as error:
        log.error("config error: %s", error)
        return 2
    except TrainingStopped as error:
        log.error("%s", error)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
