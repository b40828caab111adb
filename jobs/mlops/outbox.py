"""The tracker's queue between the training thread and the tracking thread (jobs.mlops.tracking): metric values,
bounded with the oldest dropped first and counted, and tasks that are never dropped."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class QueuedMetric:
    key: str
    value: float
    step: int
    timestamp: int


class Outbox:
    """Metric values (bounded, oldest dropped first and counted) and tasks (params, tags, artifacts,
    registrations: few, never dropped), shared by the training thread and the tracking thread."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.metrics: deque[QueuedMetric] = deque()
        self.tasks: deque[tuple[str, Callable[[], None]]] = deque()
        self.dropped = 0
        self.busy = False
        self.closed = False  # tracking ended (a refused write): only final tasks are still taken
        self.final: set[str] = set()  # names of the tasks that end the run
        self.condition = threading.Condition()

    def put_metrics(self, items: list[QueuedMetric]) -> None:
        with self.condition:
            if self.closed:
                return
            for item in items:
                if len(self.metrics) >= self.capacity:
                    self.metrics.popleft()
                    self.dropped += 1
                self.metrics.append(item)
            self.condition.notify()

    def put_task(self, name: str, task: Callable[[], None], final: bool = False) -> None:
        with self.condition:
            if self.closed and not final:
                return
            if final:
                self.final.add(name)
            self.tasks.append((name, task))
            self.condition.notify()

    def close(self, keep_final: bool) -> tuple[int, int]:
        """Discard what is queued (final tasks stay when `keep_final`); returns (metric values, tasks) dropped."""
        with self.condition:
            self.closed = True
            kept = deque(t for t in self.tasks if keep_final and t[0] in self.final)
            dropped = (len(self.metrics), len(self.tasks) - len(kept))
            self.metrics.clear()
            self.tasks = kept
            self.condition.notify_all()
            return dropped

    def return_metrics(self, items: list[QueuedMetric]) -> None:
        """Put unsent values back at the front, keeping the newest when there is no room for all."""
        with self.condition:
            room = self.capacity - len(self.metrics)
            kept = items[-room:] if room > 0 else []
            self.dropped += len(items) - len(kept)
            self.metrics.extendleft(reversed(kept))

    def empty(self) -> bool:
        return not self.metrics and not self.tasks and not self.busy
