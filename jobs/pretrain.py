"""DeepSpeed pre-training entry point: stage 1 (EAT) and stage 2 (SSLAM) are the same job, different configs.

    deepspeed [--hostfile H] jobs/pretrain.py --config base_stage2 [--set k=v ...]
    sslam pretrain --config tiny_stage1            # one machine: launches `deepspeed` for you

The DeepSpeed engine wraps the student (encoder + decoder). The teacher is an fp32 encoder on every rank,
updated from the fp32 master weights after every applied optimizer step (jobs.train.ema). One loop, one
`train_step` per update: its micro-batches forward and backward -> one all-reduce of the control flags (stop,
data exhausted, non-finite, collapse) -> optimizer step -> EMA -> logs -> checkpoint (SSLAM_SPEC §10, DESIGN.md).
Losses and stats stay on the device between log intervals.

Lifecycle (jobs.train.lifecycle): rank 0 locks the run folder (jobs.train.run_lock); SIGTERM/SIGINT checkpoint at
the next update boundary and exit 0 (StopSignal); an error on a rank is logged once, its DataLoader workers are
stopped and the process exits non-zero within FAILED_EXIT_DEADLINE_S, so the launcher ends the other ranks.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from jobs.mlops.tracking import NullTracker, Tracker
from jobs.train import checkpointing
from jobs.train.config import Config, ConfigError, dump_yaml
from jobs.train.distributed import rank_max, start_rank
from jobs.train.ema import MasterWeightEMA
from jobs.train.engine import check_deepspeed_accepts, deepspeed_config, gradient_accumulation, learning_rate, step_seed
from jobs.train.lifecycle import (
    FAILED_EXIT_DEADLINE_S, StopSignal, TrainingStopped, end_rank_process, job_main, run_locked,
)
from jobs.train.loop_state import Agreement, Meter, RunState, RunTrace, Step
from jobs.train.resume import newest_complete, on_rank0, resume_folder
from model.sslam import SSLAM

log = logging.getLogger("sslam.pretrain")


def check_dataset(info: dict, config: Config, time_patches: int) -> None:
    """Refuse a dataset whose shapes or mixture layout do not match the config, before any step."""
    from pipeline.mixers import DEFAULT_DOMAIN, MIXERS
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
    aware_mixing = config.model.padding == "aware" and config.model.stage == 2
    stored_mixer = MIXERS.get(info.get("domain", DEFAULT_DOMAIN)) if info.get("materialize_mixtures") else None
    if aware_mixing and stored_mixer is not None and "silence" in stored_mixer.allowed_mix_paddings:
        # Stored mixtures of a mixer that honours mix_padding, made with "zero", let a short partner's padding win
        # over the primary's content.
        if info.get("mix_padding", "zero") != "silence":
            wrong["mix_padding"] = (info.get("mix_padding", "zero"), "silence (model.padding=aware, stored mixtures)")
    if wrong:
        details = ", ".join(f"{k}: dataset {got!r} != config {want!r}" for k, (got, want) in wrong.items())
        raise ConfigError(f"dataset.json does not match the config ({details})")


class Pretrainer:
    """Holds the engine, the teacher EMA, the loader and the run state; `run()` is the training loop."""

    def __init__(self, config: Config):
        import deepspeed

        self.config = config
        self.device = start_rank(config)
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
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
        self.trace = RunTrace(Path(train.output_dir), self.rank, train.record_samples)
        self.stop = StopSignal()
        self.preempted = False
        # Rank 0 alone talks to MLflow, on a background thread (jobs.mlops.tracking).
        self.tracker = (
            Tracker.start(config, self.ds_config, self.dataset_info, self.world_size)
            if self.rank == 0 and config.tracking.enabled
            else NullTracker()
        )

    # ---- setup -------------------------------------------------------------------------------------
    def _read_dataset_info(self) -> dict:
        from pipeline.shardset import read_dataset_info

        try:
            return read_dataset_info(self.config.data.loader.shards)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data.loader.shards={self.config.data.loader.shards}: {error}") from None

    def _resume_tag(self) -> Path | None:
        return resume_folder(self.config, self.root, self.rank, self.world_size)

    def _on_rank0(self, decide):
        return on_rank0(self.rank, self.world_size, decide)

    def _newest_complete(self, root: Path, key: str, missing_ok: bool = False) -> Path | None:
        return newest_complete(root, key, self.config.train.verify_checkpoint_checksums, missing_ok)

    def _check_resume(self, folder: Path) -> dict:
        """Before the engine exists: the checkpoint's run state, checked against this run's data and layout.
        Another rank count, ZeRO stage or precision takes the elastic path: the model starts from the saved
        fp32 weights and `_resume` restores the optimizer from the full moments."""
        from pipeline.shares import resume_positions

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
            if not train.clips_per_update:
                log.warning("%s: keeping those clips per update (train.clips_per_update is unset)", context)
                train.clips_per_update = saved["clips_per_update"]
            try:
                accumulation = gradient_accumulation(self.config, self.world_size)
            except ConfigError as error:
                raise ConfigError(f"{context}: {error}") from None
            clips = loader.micro_batch_clips * accumulation * self.world_size
            if clips != saved["clips_per_update"]:
                raise ConfigError(
                    f"{context}: an update would take {clips} (micro_batch_clips {loader.micro_batch_clips} x "
                    f"accumulation {accumulation} x {self.world_size} ranks); set train.clips_per_update="
                    f"{saved['clips_per_update']} or leave it unset"
                )
        saved["loader_positions"] = resume_positions(positions, self.world_size, loader.num_workers)
        if self.elastic:
            from model.checkpoint import load_state_strict

            student = load_file(str(folder / checkpointing.STUDENT_FILE))
            load_state_strict(self.model, student, f"student from {folder}")
        return saved

    def _initialise_from(self, source: str) -> None:
        """Stage 2 starts from a stage-1 run of ours or an official EAT checkpoint; everything else resets (§10)."""
        from model.checkpoint import load_into_sslam, load_state_strict
        from model.official import import_official

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
        self._restore_utterance_centre(saved.get("utterance_centre"), folder)
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

    def _open_epoch(self) -> None:
        position = self.state.loader_positions[self.rank] if self.state.loader_positions else None
        self.loader = self._loader(self.state.epoch, position)
        self._batches = iter(self.loader)

    def _close_epoch(self) -> None:
        """Ends the loader's iteration, which stops its DataLoader workers (also on the way out of an error)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def _next_epoch(self) -> bool:
        """Every rank ran out of this epoch's batches: open the next epoch, unless `train.epochs` are done."""
        self._close_epoch()
        if self.rank == 0 and self.loader.dropped_samples:
            log.info(
                "epoch %d: dropped a tail of %d samples so every rank serves the same number of batches",
                self.state.epoch, self.loader.dropped_samples,
            )
        self.state.epoch += 1
        self.state.loader_positions = []
        if self.config.train.epochs and self.state.epoch >= self.config.train.epochs:
            return False
        self._open_epoch()
        return True

    def _fetch(self, queue: deque, want: int) -> None:
        """Take batches (with their sample keys) from this rank's loader until `queue` holds `want` or it ends."""
        start = time.perf_counter()
        while len(queue) < want:
            batch = next(self._batches, None)
            if batch is None:
                break
            queue.append((batch, list(self.loader.last_keys)))
        self.meter.wait += time.perf_counter() - start

    def _agree(self, batches: int, nonfinite=None, collapsed=None) -> Agreement:
        """Max over ranks of (stop, non-finite, collapse, -batches ready): the one all-reduce, and the one host
        read, of an update. The device flags are copied on the device; only the reduced result is read."""
        flags = torch.zeros(4, dtype=torch.float32, device=self.device)
        flags[0] = float(self.stop.requested is not None)
        if nonfinite is not None:
            flags[1] = nonfinite
        if collapsed is not None:
            flags[2] = collapsed
        flags[3] = -float(batches)
        stop, bad, collapse, fewest = rank_max(flags).tolist()
        return Agreement(bool(stop), bool(bad), bool(collapse), int(-fewest))

    def _fill(self, queue: deque, want: int) -> tuple[Agreement, bool]:
        """Fill `queue` to `want` micro-batches on every rank, across epochs: (agreement, data is over)."""
        while True:
            self._fetch(queue, want)
            agreement = self._agree(len(queue))
            if agreement.batches == want:
                return agreement, False
            # Some rank ran out: this epoch ends for everyone at the same micro-batch.
            while len(queue) > agreement.batches:
                queue.pop()
            if not self._next_epoch():
                return agreement, True

    def _forward(self, batch: dict, micro_step: int):
        seed = step_seed(self.config.train.seed, self.state.updates, micro_step, self.rank)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            return self.engine(batch, generator=generator)

    def _collapse_flag(self, stats: dict) -> torch.Tensor:
        train = self.config.train
        flag = torch.zeros((), dtype=torch.bool, device=self.device)
        if train.min_target_var:
            flag = flag | (stats["target_var"] < train.min_target_var)
        if train.min_pred_var:
            flag = flag | (stats["pred_var"] < train.min_pred_var)
        return flag

    def train_step(self, queue: deque) -> Step | None:
        """Forward and backward over one update's gradient-accumulation micro-batches, taken from `queue`;
        the optimizer step waits for the agreement (`run`). Non-finite losses and the collapse guards stay
        device flags. With `train.on_nonfinite_loss=skip` a non-finite micro-batch is dropped on every rank
        before its backward, which needs a flag all-reduce per micro-batch; it is replaced by the next one.
        None: the data ended before the update was complete."""
        train = self.config.train
        accumulation = self.engine.gradient_accumulation_steps()
        lr = self.scheduler.get_last_lr()[0]
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        finite_flags = []
        micro_step = 0
        while micro_step < accumulation:
            if not queue:
                agreement, over = self._fill(queue, accumulation - micro_step)
                if over:
                    return None
            batch, keys = queue.popleft()
            if self.state.updates == 0 and micro_step == 0:
                self.tracker.log_preview(batch)
            self.state.micro_steps = micro_step
            loss, parts, stats = self._forward(batch, micro_step)
            finite = torch.isfinite(loss.detach())
            if train.on_nonfinite_loss == "skip":
                if self._agree(accumulation, nonfinite=~finite).nonfinite:
                    log.error(
                        "non-finite loss at update %d (this rank's loss finite: %s); sample keys on rank %d: %s: "
                        "skipping the micro-batch on every rank", self.state.updates, bool(finite), self.rank, keys,
                    )
                    continue
            else:
                nonfinite = nonfinite | ~finite
                finite_flags.append((finite, keys))
            self.engine.backward(loss)
            if micro_step < accumulation - 1:
                self.engine.step()  # inside the accumulation: DeepSpeed only counts the micro-step
            self.meter.clips += batch["clean"].shape[0]
            self.trace.record_keys(self.state.updates, keys)
            micro_step += 1
        self.state.micro_steps = 0
        return Step(lr, loss, parts, stats, nonfinite, self._collapse_flag(stats), finite_flags)

    def _stop_reason(self, step: Step, agreement: Agreement) -> str:
        """The message of a guard stop (read from the device only now)."""
        train = self.config.train
        if agreement.nonfinite:
            flags = [(bool(finite), keys) for finite, keys in step.finite]
            keys = next((keys for finite, keys in flags if not finite), flags[-1][1] if flags else [])
            return (
                f"non-finite loss at update {self.state.updates} (this rank's losses finite: "
                f"{all(f for f, _ in flags)}); sample keys on rank {self.rank}: {keys}"
            )
        if not bool(step.collapsed):
            return f"collapse guard: tripped on another rank at update {self.state.updates + 1}"
        target_var, pred_var = float(step.stats["target_var"]), float(step.stats["pred_var"])
        if train.min_target_var and target_var < train.min_target_var:
            return (
                f"collapse guard: target variance {target_var:.3g} < train.min_target_var {train.min_target_var} "
                f"at update {self.state.updates + 1}"
            )
        return (
            f"collapse guard: prediction variance {pred_var:.3g} < train.min_pred_var {train.min_pred_var} "
            f"at update {self.state.updates + 1}"
        )

    def _restore_utterance_centre(self, centres: list | None, folder: Path) -> None:
        """A running CLS-target centre continues per rank; on another rank count every rank takes the mean of
        the saved ones (they average the same data)."""
        centre = self.model.utterance_centre
        if centre.mode != "running":
            return
        saved = [values for values in centres or [] if values is not None]
        if not saved:
            log.warning("train.resume: %s holds no running utterance centre; it restarts from the next batch", folder)
            return
        if len(centres) == self.world_size and centres[self.rank] is not None:
            values = centres[self.rank]
        else:
            values = torch.tensor(saved, dtype=torch.float32).mean(dim=0).tolist()
        centre.load(values, self.config.model.embed_dim)

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
            "utterance_centre": checkpointing.gather_from_ranks(self.model.utterance_centre.state()),
        }
        self.tracker.wait_exports()  # keep-last-M pruning may remove the folder an export reads
        checkpointing.save(
            self.engine, self.root, self.state.updates, run_state, self.model.teacher, dump_yaml(self.config),
            self.config.train.keep_checkpoints, self.scheduler,
        )
        self.tracker.on_checkpoint(self.root / checkpointing.tag_for(self.state.updates), self.state.updates)

    def _checkpoint_due(self, updates: int) -> bool:
        return updates % self.config.train.checkpoint_interval == 0

    def _log_due(self, updates: int) -> bool:
        return updates % self.config.train.log_interval == 0 or updates == self.config.train.max_updates

    def _checkpoint(self, loader) -> None:
        self.trace.flush()  # metrics.jsonl holds every update the checkpoint holds
        self._save(loader)

    def run(self) -> int:
        """One `train_step` per update, then one agreement: while the last micro-batch's gradients are
        reduced the next update's micro-batches are already fetched, unless a checkpoint follows (its loader
        position must not include them). A stop agreed with the next batches in hand trains that update first.
        """
        train = self.config.train
        self.meter = Meter()
        saved_at = self.state.updates if self.state.updates else -1  # a resumed run's checkpoint exists already
        accumulation = self.engine.gradient_accumulation_steps()
        queue: deque = deque()
        stopping = False
        relinked = False
        self._batches = None
        if train.epochs and self.state.epoch >= train.epochs:
            self.loader = None
        else:
            self._open_epoch()
        try:
            while self.loader is not None and self.state.updates < train.max_updates:
                if not queue:
                    agreement, over = self._fill(queue, accumulation)
                    stopping = stopping or agreement.stop
                    if over:
                        break
                step = self.train_step(queue)
                if step is None:
                    break
                last = stopping or self._checkpoint_due(self.state.updates + 1) or (
                    self.state.updates + 1 >= train.max_updates)
                if not last:
                    self._fetch(queue, accumulation)
                agreement = self._agree(len(queue) if not last else accumulation, step.nonfinite, step.collapsed)
                if agreement.nonfinite or agreement.collapsed:
                    raise TrainingStopped(self._stop_reason(step, agreement))
                self.engine.step()
                if self.engine.was_step_applied():
                    if not relinked:  # every param group has its Adam state now (checkpointing.full_moments)
                        checkpointing.relink_optimizer_states(self.engine)
                        relinked = True
                    self.state.updates += 1
                    decay = self.model.ema_decay(self.state.updates)
                    self.ema.update(decay)
                    self.trace.record_update(self.state.updates, step.lr, decay, step.loss)
                    if self._log_due(self.state.updates):
                        self._log(step)
                    if self._checkpoint_due(self.state.updates):
                        self._checkpoint(self.loader)
                        saved_at = self.state.updates
                else:
                    log.warning("optimizer step skipped (loss-scale overflow) at update %d", self.state.updates)
                if stopping or (agreement.stop and not queue):
                    log.warning("%s: writing a checkpoint at update %d, then exiting",
                                self.stop.requested or "a signal on another rank", self.state.updates)
                    if saved_at != self.state.updates:
                        self._checkpoint(self.loader)
                    self.preempted = True
                    return 0
                stopping = agreement.stop
                if queue and agreement.batches < accumulation:  # an epoch ended inside the prefetch
                    while len(queue) > agreement.batches:
                        queue.pop()
                    if not self._next_epoch():
                        break
            if saved_at != self.state.updates:
                self._checkpoint(self.loader if self.state.updates < train.max_updates else None)
        finally:
            self._close_epoch()
        log.info("finished at update %d (epoch %d)", self.state.updates, self.state.epoch)
        return 0

    def _log(self, step: Step) -> None:
        """The log interval's host reads: losses, stats, the gradient norm."""
        self.trace.flush()
        elapsed = max(1e-9, time.perf_counter() - self.meter.start)
        metrics = {
            "loss": float(step.loss.detach()),
            **{f"loss_{k}": float(v) for k, v in step.parts.items()},
            "lr": self.scheduler.get_last_lr()[0],
            "ema_decay": self.model.ema_decay(self.state.updates),
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "clips_per_s": self.meter.clips * self.world_size / elapsed,
            "data_wait_fraction": self.meter.wait / elapsed,
            "target_var": float(step.stats["target_var"]),
            "pred_var": float(step.stats["pred_var"]),
        }
        self.meter = Meter()
        if self.rank == 0:
            log.info("update %d %s", self.state.updates, " ".join(f"{k}={v:.5g}" for k, v in metrics.items()))
            self.tracker.log_metrics(metrics, self.state.updates)


def train(config: Config) -> int:
    """Run one pre-training job in this process (one rank); see run_locked."""
    return run_locked(config, Pretrainer, lambda trainer: trainer.trace.close(), lambda trainer: trainer.state.updates)


def main(argv: list[str] | None = None, exit_deadline_s: float | None = None) -> int:
    """Exit codes: 0 done or preempted with a checkpoint, 1 failed, 2 config / run folder / op build refused,
    3 a guard stopped the run. `exit_deadline_s`: a failed process ends within that many seconds (set for a
    rank process; never for a caller that keeps running)."""
    return job_main("SSLAM pre-training (run under the deepspeed launcher)", train, argv, exit_deadline_s)


if __name__ == "__main__":
    end_rank_process(main(exit_deadline_s=FAILED_EXIT_DEADLINE_S))
