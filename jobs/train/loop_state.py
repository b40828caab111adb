"""What pre-training's loop records and agrees on: the run state a checkpoint holds (`RunState`), the trace
resume tests compare (`RunTrace`: metrics.jsonl and the consumed sample keys), the control flags every rank
agrees on once per update (`Agreement`), the throughput meter and one update's device results (`Step`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


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


@dataclass
class Agreement:
    """The control flags of one update, agreed by every rank in one all-reduce (`jobs.pretrain.Pretrainer._agree`)."""

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
