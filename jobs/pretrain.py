"""DeepSpeed pre-training entry point: stage 1 (EAT) and stage 2 (SSLAM) are the same job, different configs.

    deepspeed [--hostfile H] jobs/pretrain.py --config base_stage2 [--set k=v ...]
    sslam pretrain --config tiny_stage1            # one machine: launches `deepspeed` for you

The DeepSpeed engine wraps the student (encoder + decoder). The teacher is an fp32 encoder on every rank,
updated from the fp32 master weights after every applied optimizer step (jobs.train.ema). One loop, one
`train_step` per update: its micro-batches forward and backward -> one all-reduce of the control flags (stop,
data exhausted, non-finite, collapse) -> optimizer step -> EMA -> logs -> checkpoint (SSLAM_SPEC §10, DESIGN.md).
Losses and stats stay on the device between log intervals.

Lifecycle: rank 0 locks the run folder (jobs.train.run_lock); SIGTERM/SIGINT checkpoint at the next update boundary
and exit 0 (StopSignal); an error on a rank is logged once, its DataLoader workers are stopped and the process
exits non-zero within FAILED_EXIT_DEADLINE_S, so the launcher ends the other ranks.
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
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from jobs.train import checkpointing, op_builds, run_lock
from jobs.train.config import Config, ConfigError, add_config_arguments, config_from_args, dump_yaml, merge_deepspeed_passthrough
from jobs.train.ema import MasterWeightEMA
from jobs.mlops.tracking import NullTracker, Tracker
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
    aware_mixing = config.model.padding == "aware" and config.model.stage == 2
    if aware_mixing and info.get("materialize_mixtures") and info.get("domain", "logmel_max") == "logmel_max":
        # Stored log-mel max mixtures made with "zero" let a short partner's padding win over the primary's content.
        if info.get("mix_padding", "zero") != "silence":
            wrong["mix_padding"] = (info.get("mix_padding", "zero"), "silence (model.padding=aware, stored mixtures)")
    if wrong:
        details = ", ".join(f"{k}: dataset {got!r} != config {want!r}" for k, (got, want) in wrong.items())
        raise ConfigError(f"dataset.json does not match the config ({details})")


def step_seed(seed: int, update: int, micro_step: int, rank: int) -> int:
    """Masks and decoder noise are a function of (seed, update, micro-step, rank): resume replays them exactly."""
    return int(np.random.SeedSequence([seed, update, micro_step, rank]).generate_state(1)[0])


def on_rank0(rank: int, world_size: int, decide):
    """Rank 0 decides (reading the checkpoint folders once), every rank gets its answer or its ConfigError."""
    answer = [None]
    if rank == 0:
        try:
            answer = [("ok", decide())]
        except (ConfigError, OSError) as error:  # the other ranks are waiting in the broadcast
            answer = [("error", str(error))]
    if dist.is_initialized() and world_size > 1:
        dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def newest_complete(root: Path, key: str, rehash: bool, missing_ok: bool = False) -> Path | None:
    """The newest complete checkpoint under `root`, each newer partial one reported; ConfigError (naming `key`)
    when there is none, unless `missing_ok`."""
    choice = checkpointing.latest_complete(root, rehash)
    for tag, reason in choice.skipped:
        log.warning("%s: skipping checkpoint %s: %s", key, root / tag, reason)
    if choice.folder is None and not missing_ok:
        reasons = "; ".join(f"{tag}: {reason}" for tag, reason in choice.skipped)
        raise ConfigError(f"{key}: no checkpoint under {root}" + (f" is complete ({reasons})" if reasons else ""))
    if choice.folder is not None and choice.skipped:
        log.warning("%s: continuing from the newest complete checkpoint %s", key, choice.folder)
    return choice.folder


def resume_folder(config: Config, root: Path, rank: int, world_size: int) -> Path | None:
    """The checkpoint folder to continue from: train.resume=auto takes this run's newest complete one under
    `root`, a path names a tag folder (which must be complete) or a run / checkpoints folder (its newest
    complete)."""
    resume, rehash = config.train.resume, config.train.verify_checkpoint_checksums
    if resume == "never":
        return None
    if resume == "auto":
        return on_rank0(rank, world_size, lambda: newest_complete(root, "train.resume", rehash, missing_ok=True))
    path = Path(resume)
    if checkpointing.TAG_PATTERN.match(path.name) and path.is_dir():
        problem = on_rank0(rank, world_size, lambda: checkpointing.verify(path, rehash))
        if problem is not None:
            raise ConfigError(f"train.resume={resume}: the checkpoint is not complete ({problem})")
        return path
    if path.is_dir():
        tags = checkpointing.checkpoint_root(path) if (path / "checkpoints").is_dir() else path
        return on_rank0(rank, world_size, lambda: newest_complete(tags, "train.resume", rehash))
    raise ConfigError(f"train.resume: no checkpoint folder {resume}")


@dataclass
class RunState:
    updates: int = 0
    epoch: int = 0
    micro_steps: int = 0  # micro-steps of the current update
    loader_positions: list = field(default_factory=list)


class RunTrace:
    """`metrics.jsonl` (rank 0: update, lr used, EMA decay, loss) and, with `train.record_samples`,
    `samples_rank{r}.jsonl` (the sample keys each rank consumed per update): what resume tests compare.
    Losses stay on the device until `flush()` (log intervals, checkpoints, the end): one host read for many."""

    def __init__(self, output_dir: Path, rank: int, record_samples: bool):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(output_dir / "metrics.jsonl", "a") if rank == 0 else None
        self.samples = open(output_dir / f"samples_rank{rank}.jsonl", "a") if record_samples else None
        self._updates: list[tuple[int, float, float, torch.Tensor]] = []

    def record_update(self, update: int, lr: float, ema_decay: float, loss: torch.Tensor) -> None:
        if self.metrics is not None:
            self._updates.append((update, lr, ema_decay, loss.detach()))

    def record_keys(self, update: int, keys: list[str]) -> None:
        if self.samples is not None:
            self.samples.write(json.dumps({"update": update, "keys": keys}) + "\n")
            self.samples.flush()

    def flush(self) -> None:
        if not self._updates:
            return
        losses = torch.stack([loss for *_, loss in self._updates]).tolist()
        for (update, lr, decay, _), loss in zip(self._updates, losses):
            self.metrics.write(json.dumps({"update": update, "lr": lr, "ema_decay": decay, "loss": loss}) + "\n")
        self.metrics.flush()
        self._updates = []

    def close(self) -> None:
        self.flush()
        for handle in (self.metrics, self.samples):
            if handle is not None:
                handle.close()


class StopSignal:
    """SIGTERM or SIGINT (preemption, Ctrl-C) sets a flag: every rank checkpoints at the next update boundary and
    exits 0. A second signal ends the process at once, exit 128 + signal number, without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            log.error("second signal (%s after %s): exiting now, without a checkpoint", name, self.requested)
            logging.shutdown()
            os._exit(128 + signum)
        self.requested = name
        log.warning("%s: checkpointing at the next update boundary, then exiting (a second signal exits at once)",
                    name)

    def close(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


@dataclass
class Agreement:
    """The control flags of one update, agreed by every rank in one all-reduce (`Pretrainer._agree`)."""

    stop: bool
    nonfinite: bool
    collapsed: bool
    batches: int  # the fewest micro-batches any rank has ready


@dataclass
class Meter:
    start: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    clips: int = 0


@dataclass
class Step:
    """One update's last loss, parts and stats (device tensors) and what it needs to explain a stop."""

    lr: float
    loss: torch.Tensor
    parts: dict
    stats: dict
    nonfinite: torch.Tensor
    collapsed: torch.Tensor
    finite: list  # per micro-batch: (device bool, sample keys), read only when a stop needs the keys


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
        from pipeline.loader import read_dataset_info

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
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad, collapse, fewest = flags.tolist()
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

FAILED_EXIT_DEADLINE_S = 20.0
# How gloo reports a collective whose peer process is gone (a plain RuntimeError; NCCL raises a DistError).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer")


def run_locked(config: Config, build, close_outputs, updates_of) -> int:
    """Build a trainer (`build(config)`) and run it in this process (one rank). Rank 0 holds the run folder's lock
    (jobs.train.run_lock) from before the first collective to the end; afterwards `close_outputs(trainer)`, the stop
    signal and the tracking run are closed, and a run that did not fail is recorded in the lock with
    `updates_of(trainer)`. The process group stays up for the caller."""
    holding = run_lock.hold(config.train.output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
    with holding as lock:
        trainer = build(config)
        status = "FAILED"
        try:
            code = trainer.run()
            status = "KILLED" if trainer.preempted else "FINISHED"
            return code
        finally:
            close_outputs(trainer)
            trainer.stop.close()
            trainer.tracker.finish(status)
            if lock is not None and status != "FAILED":
                lock.record("preempted" if trainer.preempted else "finished", update=updates_of(trainer))


def train(config: Config) -> int:
    """Run one pre-training job in this process (one rank); see run_locked."""
    return run_locked(config, Pretrainer, lambda trainer: trainer.trace.close(), lambda trainer: trainer.state.updates)


def _exit_after(seconds: float, code: int) -> None:
    """A failed rank leaves even when its teardown hangs (an NCCL communicator with work in flight, a stuck
    child joined at exit): a daemon timer ends the process with `code`."""

    def end() -> None:
        log.error("teardown took over %.0f s: exiting now", seconds)
        logging.shutdown()
        os._exit(code)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()


def _report_failure(error: BaseException) -> None:
    """Name the error and this rank once. A collective that broke because a peer died is that peer's error,
    reported by it (and by the launcher): here a one-line note without a traceback."""
    rank = os.environ.get("RANK", "0")
    if isinstance(error, dist.DistError) or any(marker in str(error) for marker in PEER_LOST):
        log.error("rank %s stopping: a collective failed, a peer rank is gone (%s)", rank,
                  str(error).splitlines()[0] if str(error) else type(error).__name__)
    else:
        # A DataLoader worker's error arrives as several lines, the worker's own error last.
        lines = [line for line in str(error).splitlines() if line.strip()] or [""]
        summary = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}"
        log.error("rank %s failed: %s: %s", rank, type(error).__name__, summary, exc_info=error)


def end_rank_process(code: int) -> None:
    """End a rank process once main() has torn everything down (tracking finished, checkpoints written,
    process group destroyed). Interpreter shutdown is skipped on purpose: there, native destructors of
    torch.distributed / DeepSpeed objects sometimes meet a still-joinable C++ thread and call std::terminate
    ("terminate called without an active exception", SIGABRT), turning a finished run into a failed launch."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None, exit_deadline_s: float | None = None) -> int:
    """Exit codes: 0 done or preempted with a checkpoint, 1 failed, 2 config / run folder / op build refused,
    3 a guard stopped the run. `exit_deadline_s`: a failed process ends within that many seconds (set for a
    rank process; never for a caller that keeps running)."""
    return job_main("SSLAM pre-training (run under the deepspeed launcher)", train, argv, exit_deadline_s)


def job_main(description: str, run_job, argv: list[str] | None, exit_deadline_s: float | None) -> int:
    """A rank process of a training job (pre-training, fine-tuning): `--config`, `--set`, `--resume`, logging,
    `run_job(config)`, the exit codes of `main`, the fail-fast deadline and the process group's teardown."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (train.resume=auto)")
    args = parser.parse_args(argv)
    # A rank that dies inside native code (gloo, NCCL, a DeepSpeed op) prints the Python stack of every thread.
    faulthandler.enable()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank{os.environ.get('RANK', 0)} %(levelname)s %(name)s: %(message)s",
    )
    code = 1
    try:
        config = config_from_args(args)
        if args.resume:
            config.train.resume = "auto"
        op_builds.clear_stale_locks(op_builds.configure())
        code = run_job(config)
    except (ConfigError, CheckpointError) as error:
        log.error("config error: %s", error)
        code = 2
    except (run_lock.RunFolderBusy, op_builds.OpBuildLocked) as error:
        log.error("%s", error)
        code = 2
    except TrainingStopped as error:
        log.error("%s", error)
        code = 3
    except Exception as error:
        _report_failure(error)
        code = 1
    finally:
        if code not in (0, 2, 3) and exit_deadline_s is not None:
            _exit_after(exit_deadline_s, code)
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    end_rank_process(main(exit_deadline_s=FAILED_EXIT_DEADLINE_S))
