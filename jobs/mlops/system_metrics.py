"""System metrics of a tracked run (jobs.mlops.tracking): MLflow's CPU / memory / disk / network / GPU collectors
(GPU memory through torch when NVML is missing), sampled on their own thread into the tracker's outbox."""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from jobs.mlops.lineage import system_metrics_interval
from jobs.mlops.outbox import Outbox, QueuedMetric

log = logging.getLogger("sslam.tracking")


def _torch_gpu_memory_monitor():
    """GPU memory of this process's device through torch, when MLflow's NVML-based GPU monitor is unavailable
    (the `nvidia-ml-py` package is missing): `gpu_{i}_memory_usage_megabytes` / `_percentage`, MLflow's names."""
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor

    class TorchGPUMemoryMonitor(BaseMetricsMonitor):
        def __init__(self) -> None:
            super().__init__()
            self.device = int(os.environ.get("LOCAL_RANK", 0))

        def collect_metrics(self) -> None:
            free, total = torch.cuda.mem_get_info(self.device)
            self._metrics[f"gpu_{self.device}_memory_usage_megabytes"].append((total - free) / 1e6)
            self._metrics[f"gpu_{self.device}_memory_usage_percentage"].append(100.0 * (total - free) / total)

        def aggregate_metrics(self) -> dict[str, float]:
            return {key: round(sum(values) / len(values), 1) for key, values in self._metrics.items() if values}

    return TorchGPUMemoryMonitor()


class SystemSampler:
    """MLflow's system-metrics collectors (psutil CPU / memory / disk / network, NVIDIA or ROCm GPUs when
    present) sampled on their own thread into the tracker's queue, so an unreachable server neither stops
    sampling (MLflow's own monitor gives up) nor blocks anything."""

    def __init__(self, outbox: Outbox, interval_s: float = 0.0) -> None:
        self.outbox = outbox
        self.interval_s = interval_s  # 0: MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, else scaled to the run
        self.started = time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, name="sslam-system-metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Take the last sample now and end; waits for it (collectors still being built included) up to 10 s."""
        self.stopped.set()
        self.thread.join(timeout=10.0)

    @staticmethod
    def _collectors() -> list:
        """The collectors MLflow's SystemMetricsMonitor uses: CPU and memory, disk, network, a GPU when present."""
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
        from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

        collectors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        for gpu in (GPUMonitor, ROCMMonitor):
            try:
                collectors.append(gpu())
                return collectors
            except Exception:  # noqa: BLE001 - no such GPU or library
                continue
        if torch.cuda.is_available():
            collectors.append(_torch_gpu_memory_monitor())
        return collectors

    def _sample(self) -> None:
        try:  # built here, off the training thread: importing MLflow and probing GPUs takes seconds
            monitors = self._collectors()
        except Exception as error:  # noqa: BLE001
            log.warning("no system metrics: %s", error)
            return
        from mlflow.environment_variables import (
            MLFLOW_SYSTEM_METRICS_NODE_ID,
            MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING,
            MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL,
        )

        node = MLFLOW_SYSTEM_METRICS_NODE_ID.get()
        prefix = "system/" + (f"{node}/" if node else "")
        configured = self.interval_s or float(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 0)
        per_log = max(1, int(MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING.get() or 1))
        step, collected = 0, 0
        while True:
            try:
                for collector in monitors:
                    collector.collect_metrics()
                collected += 1
                stopping = self.stopped.wait(system_metrics_interval(time.monotonic() - self.started, configured))
                if collected < per_log and not stopping:
                    continue
                values: dict[str, float] = {}
                for collector in monitors:
                    values.update(collector.aggregate_metrics())
                    collector.clear_metrics()
            except Exception as error:  # noqa: BLE001 - a broken collector must not reach training
                log.warning("system metrics sampling stopped: %s", error)
                return
            now = int(time.time() * 1000)
            self.outbox.put_metrics([QueuedMetric(prefix + k, float(v), step, now) for k, v in values.items()])
            step, collected = step + 1, 0
            if stopping:  # the last values, taken when the run ends: a run shorter than the interval has one
                return
