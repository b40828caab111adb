"""MLflow run tracking of the pre-training job: where runs go, and a tracker that never blocks training.

Where runs go: jobs.mlops.client (the project-level store, or `MLFLOW_TRACKING_URI`).

The tracker (`Tracker.start(...)`, rank 0 only; other ranks use `NullTracker`) puts everything on a background
thread: the run's creation, params (the flattened resolved config, long values truncated to MLflow's limit), tags
(dataset fingerprint, stage, world size; source `jobs.pretrain`, user and git commit as MLflow's own tags), the
shard set as a dataset input (jobs.mlops.lineage: name, source URI, fingerprint, the counts of dataset.json),
artifacts (resolved config YAML, DeepSpeed config JSON, dataset.json, a PNG preview of the first batch:
jobs.mlops.preview), metrics, system metrics (jobs.mlops.system_metrics: MLflow's own CPU / memory / disk / network
/ GPU collectors, every `tracking.system_metrics_interval_s` or `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` seconds,
else at an interval scaled to the run, 1 s to 10 s, and once more when the run ends) and model registrations.
Metric values wait in a bounded queue (jobs.mlops.outbox): when it is full the oldest are dropped and counted
(`dropped_metrics`, and the metric `tracking/dropped_metrics`). HTTP calls use short timeouts and one retry (set in
this process unless the user set MLflow's variables). An unreachable server is reported once as a warning; the
thread keeps retrying every `tracking.retry_interval_s` and says when the server is back.

A store that refuses writes (HTTP 401 / 403, PERMISSION_DENIED, or a local artifact store failing with an OS
error: read-only, permissions, a file where a folder should be, a full disk) ends the run's tracking: one warning
names the refused call and the reason, everything queued or logged later is discarded (training itself goes on,
unaffected), and `finish` marks the MLflow run FAILED with the reason in its tag `sslam.tracking_error` (when the
server still takes that; else a warning says it could not). Retrying would not help and would leave the run
RUNNING with a growing backlog.

Registrations follow `tracking.register`: `never`; `end` (the default): the last checkpoint of a run that ends
FINISHED, at `finish`; `every_checkpoint`: each checkpoint at `on_checkpoint` (the last one included). Each moves
the aliases of `tracking.aliases` and no others (jobs.mlops.registry), so a smoke run next to a real one leaves
`candidate` where it was unless its config names it. The checkpoint is exported to a local MLflow model folder
first, from its `student.safetensors` on an export thread of its own (jobs.mlops.registration.BackgroundExport),
persisted as a pending registration under `<output_dir>/registrations/`, then uploaded and registered on the
background thread. A failed one stays pending and is retried at the next checkpoint,
at the end, and by `sslam register RUN_DIR` (`registry.register_pending`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from jobs.train.config import Config, dump_yaml, flatten
from jobs.mlops.client import ensure_experiment, is_permanent, is_refusal, mlflow_client, param_value, tracking_uri
from jobs.mlops.lineage import GIT_COMMIT, lineage_tags, shard_set_input
from jobs.mlops.outbox import Outbox, QueuedMetric
from jobs.mlops.preview import PREVIEW_CLIPS, render_preview
from jobs.mlops.system_metrics import SystemSampler

log = logging.getLogger("sslam.tracking")

RUN_FILE = "mlflow_run.json"
# Short HTTP behaviour for the training process, unless the user chose otherwise (MLflow retries for minutes).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
FAILURE_TAG = "sslam.tracking_error"
MAX_TAG_LENGTH = 5000
DROPPED_METRIC = "tracking/dropped_metrics"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit
RETRY_REGISTRATIONS = "register pending models"
TRAINING_ENTRY_POINT = "jobs.pretrain"  # the module every rank runs (mlflow.source.name of training runs)


def run_tags(config: Config, dataset_info: dict | None, world_size: int,
             entry_point: str = TRAINING_ENTRY_POINT) -> dict[str, str]:
    """The training run's tags: stage, world size, encoder, config, dataset fingerprint, and lineage (source
    `entry_point`, user, git commit: jobs.mlops.lineage)."""
    from jobs.mlops.registration import encoder_name

    tags = {
        "stage": str(config.model.stage),
        "world_size": str(world_size),
        "encoder": encoder_name(config.model),
        "config_name": config.name,
        "dataset_fingerprint": str((dataset_info or {}).get("fingerprint", "")),
        **lineage_tags(entry_point),
    }
    if GIT_COMMIT in tags:
        tags["git_commit"] = tags[GIT_COMMIT]
    return tags


# ----------------------------------------------------------------------------------------- the trackers


class NullTracker:
    """What ranks other than 0 (and runs without tracking) hold: every call does nothing."""

    run_id: str | None = None
    dropped_metrics = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_preview(self, batch: dict[str, torch.Tensor]) -> None:
        pass

    def on_checkpoint(self, tag_dir: str | Path, updates: int) -> None:
        pass

    def wait_exports(self) -> None:
        pass

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

    def finish(self, status: str = "FINISHED") -> None:
        pass


class Tracker:
    """One MLflow run of a pre-training job, fed from rank 0 without ever waiting on MLflow (module docstring)."""

    entry_point = TRAINING_ENTRY_POINT  # the run's mlflow.source.name

    def __init__(
        self,
        config: Config,
        ds_config: dict | None = None,
        dataset_info: dict | None = None,
        world_size: int = 1,
    ) -> None:
        self.config = config
        self.dataset_info = dataset_info or {}
        self.world_size = world_size
        self.uri = tracking_uri()
        self.run_dir = Path(config.train.output_dir)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._outbox = Outbox(config.tracking.queue_size)
        self._staging = Path(tempfile.mkdtemp(prefix="sslam-tracking-"))
        self._unreachable = False
        self.refused: str | None = None  # why the store refused a write (tracking ended), if it did
        self._marked_failed = False
        self._stopping = False
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._last_checkpoint: tuple[Path, int] | None = None
        self._exported: set[int] = set()
        from jobs.mlops.registration import BackgroundExport

        self._exports = BackgroundExport()
        self._dropped_reported = 0
        self._client = None
        self._queue_start_artifacts(ds_config)
        self._thread = threading.Thread(target=self._work, name="sslam-mlflow", daemon=True)
        self._sampler: SystemSampler | None = None

    @classmethod
    def start(
        cls,
        config: Config,
        ds_config: dict | None = None,
        dataset_info: dict | None = None,
        world_size: int = 1,
    ) -> Tracker:
        """Start tracking on this process (rank 0). Returns at once: MLflow is reached on a background thread."""
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        tracker = cls(config, ds_config, dataset_info, world_size)
        tracker._thread.start()
        if config.tracking.system_metrics:
            tracker._sampler = SystemSampler(tracker._outbox, config.tracking.system_metrics_interval_s)
            tracker._sampler.start()
        log.info("tracking to %s (experiment %r)", tracker.uri, config.tracking.experiment)
        return tracker

    @property
    def dropped_metrics(self) -> int:
        return self._outbox.dropped

    # ---- calls from the training loop (all return at once) ----------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._outbox.put_metrics([QueuedMetric(k, float(v), int(step), now) for k, v in metrics.items()])

    def log_preview(self, batch: dict[str, torch.Tensor]) -> None:
        """Queue the PNG preview of (the first clips of) a training batch."""
        keep = PREVIEW_CLIPS
        copied = {k: v[:keep].detach().cpu().clone() for k, v in batch.items() if k in ("clean", "mixed", "nomix")}
        if "partner" in batch:
            copied["partner"] = batch["partner"][:keep].detach().cpu().clone()

        def task() -> None:
            self._log_artifact(render_preview(copied, self.config.model, self._staging / "preview.png"), "preview")

        self._outbox.put_task("log the batch preview", task)

    def on_checkpoint(self, tag_dir: str | Path, updates: int) -> None:
        """After every rank finished writing checkpoint `tag_dir`: export + queue its registration when
        `tracking.register` is `every_checkpoint`; always retry the run's pending registrations."""
        self._last_checkpoint = (Path(tag_dir), int(updates))
        if self.config.tracking.register == "every_checkpoint":
            self._export(Path(tag_dir), int(updates))
        self._outbox.put_task(RETRY_REGISTRATIONS, self._register_pending)

    def wait_exports(self) -> None:
        """Wait for the export still running, if any: before the checkpoint or best folder it reads is pruned or
        replaced (it runs while training goes on; only one slower than a checkpoint interval makes this wait)."""
        self._exports.wait()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far was exported and sent (or timeout); True when the queue is empty."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if not self._exports.wait(timeout_s):
            return False
        with self._outbox.condition:
            while not self._outbox.empty():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._outbox.condition.wait(timeout=0.1 if remaining is None else min(0.1, remaining))
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: register the last checkpoint (status FINISHED, unless `tracking.register` is `never`), send
        what is queued within `tracking.finish_timeout_s`, mark the run terminated. Pending registrations stay on
        disk."""
        if self._stopping:
            return
        if self._sampler is not None:
            self._sampler.stop()
        if status == "FINISHED" and self._last_checkpoint is not None and self.config.tracking.register != "never":
            self._export(*self._last_checkpoint)
        self._exports.wait()
        self._outbox.put_task(RETRY_REGISTRATIONS, self._register_pending)
        self._outbox.put_task(f"end the run ({status})", functools.partial(self._end_run, status), final=True)
        self._deadline = time.monotonic() + self.config.tracking.finish_timeout_s
        sent = self.flush(self.config.tracking.finish_timeout_s)
        with self._outbox.condition:
            self._stopping = True
            left = len(self._outbox.metrics), [name for name, _ in self._outbox.tasks]
            self._outbox.condition.notify_all()
        self._stop.set()
        self._thread.join(timeout=5.0)
        if not sent:
            log.warning(
                "MLflow at %s did not take everything before the deadline: %d metric values and tasks %s are lost; "
                "pending registrations stay under %s (run `sslam register %s`)",
                self.uri, left[0], left[1], self.run_dir / "registrations", self.run_dir,
            )
        if self._exports.failures:
            log.warning("%d checkpoint exports failed, so these are not registered: %s", len(self._exports.failures),
                        "; ".join(self._exports.failures))
        if self.dropped_metrics:
            log.warning("%d metric values were dropped because the tracking queue was full", self.dropped_metrics)
        if self.refused is not None:
            if self._marked_failed:
                log.warning("MLflow run %s is marked FAILED (tag %s): %s", self.run_id, FAILURE_TAG, self.refused)
            else:
                log.warning("tracking ended early (%s) and the MLflow run %s could not be marked FAILED", self.refused,
                            self.run_id or "(never created)")
        shutil.rmtree(self._staging, ignore_errors=True)

    def _end_run(self, status: str) -> None:
        """The last task: FAILED with the reason when the store refused a write, else `status`."""
        if self.refused is None:
            self._client.set_terminated(self.run_id, status)
            return
        self._client.set_tag(self.run_id, FAILURE_TAG, self.refused[:MAX_TAG_LENGTH])
        self._client.set_terminated(self.run_id, "FAILED")
        self._marked_failed = True

    # ---- the tracking thread ----------------------------------------------------------------------------
    def _work(self) -> None:
        """The tracking thread: create the run, then tasks in order, then metric batches; on failure wait
        `retry_interval_s` and try again (until `finish`'s deadline)."""
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        outbox = self._outbox
        while True:
            task: tuple[str, Callable[[], None]] | None = None
            batch: list[QueuedMetric] = []
            with outbox.condition:
                while not outbox.metrics and not outbox.tasks and not self._stopping:
                    outbox.condition.wait()
                if self._stopping:
                    return
                if self.run_id is None and outbox.closed:  # refused before the run existed: nothing left to end
                    outbox.tasks.clear()
                    outbox.condition.notify_all()
                    continue
                outbox.busy = True
                if self.run_id is None:
                    task = ("create the run", self._create_run)
                elif outbox.tasks:
                    task = outbox.tasks[0]
                else:
                    while outbox.metrics and len(batch) < MAX_METRICS_PER_BATCH - 1:
                        batch.append(outbox.metrics.popleft())
            try:
                if self._client is None:
                    self._client = mlflow_client(self.uri)
                if task is not None:
                    self._run_task(*task)
                    if task[1] != self._create_run:
                        with outbox.condition:
                            outbox.tasks.popleft()
                elif batch:
                    self._send_metrics(batch)
                if task is None or task[0] != RETRY_REGISTRATIONS:  # registrations report their own failures
                    self._reachable()
            except Exception as error:  # noqa: BLE001 - no failure of MLflow may reach training
                if is_refusal(error):
                    with outbox.condition:
                        if task is not None and task[1] != self._create_run:
                            outbox.tasks.popleft()  # the refused task itself
                    self._end_tracking(task[0] if task is not None else f"log {len(batch)} metric values", error)
                    with outbox.condition:
                        outbox.busy = False
                        outbox.condition.notify_all()
                    continue
                if batch:
                    outbox.return_metrics(batch)
                self._report_unreachable(error)
                if not self._wait_before_retry():
                    return
                continue
            with outbox.condition:
                outbox.busy = False
                outbox.condition.notify_all()

    def _end_tracking(self, what: str, error: BaseException) -> None:
        """A refused write: warn once, discard the backlog, keep only the task that marks the run FAILED (and
        not even that when the refused call is that task, or when the run was never created)."""
        reason = f"MLflow at {self.uri} refused to {what}: {type(error).__name__}: {str(error).splitlines()[0][:500]}"
        outbox = self._outbox
        if self.refused is not None:
            log.warning("%s (after tracking had ended)", reason)
            outbox.close(keep_final=False)
            return
        self.refused = reason
        metrics, tasks = outbox.close(keep_final=self.run_id is not None)
        log.warning(
            "%s; tracking of this run ends here (%d queued metric values and %d tasks discarded, later ones are not "
            "sent); training continues, and the run is marked FAILED when it ends. Pending registrations stay under "
            "%s (`sslam register %s`)", reason, metrics, tasks, self.run_dir / "registrations", self.run_dir,
        )

    def _wait_before_retry(self) -> bool:
        """Sleep `retry_interval_s` (new metrics do not wake it; `finish` does); False once stopping or past
        the finish deadline."""
        outbox = self._outbox
        with outbox.condition:
            outbox.busy = False
            outbox.condition.notify_all()
        wait = self.config.tracking.retry_interval_s
        if self._deadline is not None:
            wait = min(wait, max(0.0, self._deadline - time.monotonic()))
        self._stop.wait(wait)
        return not self._stop.is_set() and (self._deadline is None or time.monotonic() < self._deadline)

    def _run_task(self, name: str, task: Callable[[], None]) -> None:
        try:
            task()
        except Exception as error:
            if is_permanent(error):
                log.warning("MLflow refused to %s (%s); skipped", name, error)
                return
            raise

    def _send_metrics(self, batch: list[QueuedMetric]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(m.key, m.value, m.timestamp, m.step) for m in batch]
        if self._outbox.dropped != self._dropped_reported:
            self._dropped_reported = self._outbox.dropped
            now = int(time.time() * 1000)
            metrics.append(Metric(DROPPED_METRIC, float(self._dropped_reported), now, batch[-1].step))
        try:
            self._client.log_batch(self.run_id, metrics=metrics)
        except Exception as error:
            if is_permanent(error):
                log.warning("MLflow refused %d metric values (%s); dropped", len(batch), error)
                return
            raise

    def _reachable(self) -> None:
        if self._unreachable:
            self._unreachable = False
            log.warning("MLflow at %s is reachable again; logging resumes", self.uri)

    def _report_unreachable(self, error: BaseException) -> None:
        if not self._unreachable:
            self._unreachable = True
            log.warning(
                "MLflow at %s is unreachable (%s: %s); training continues, tracking retries every %g s and "
                "keeps the newest %d metric values", self.uri, type(error).__name__, str(error).splitlines()[0][:300],
                self.config.tracking.retry_interval_s, self._outbox.capacity,
            )

    # ---- tasks --------------------------------------------------------------------------------------------
    def _create_run(self) -> None:
        client = self._client
        self.experiment_id = ensure_experiment(client, self.config.tracking.experiment)
        run_id = self._resumable_run(client)
        if run_id is None:
            run = client.create_run(
                self.experiment_id,
                run_name=self.config.tracking.run_name or None,
                tags=run_tags(self.config, self.dataset_info, self.world_size, self.entry_point),
            )
            run_id = run.info.run_id
            with self._outbox.condition:  # first tasks of the run, retried like any other
                if self.dataset_info:
                    self._outbox.tasks.appendleft(("log the shard set as a dataset input", self._log_shard_set))
                self._outbox.tasks.appendleft(("log the params", self._log_params))
        self.run_id = run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RUN_FILE).write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}))
        log.info("MLflow run %s in experiment %s at %s", self.run_id, self.experiment_id, self.uri)

    def _log_params(self) -> None:
        from mlflow.entities import Param

        params = [Param(key, param_value(value)) for key, value in flatten(self.config).items()]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_PER_BATCH])

    def _log_shard_set(self) -> None:
        self._client.log_inputs(self.run_id, datasets=[shard_set_input(self.dataset_info, self.config.data.loader.shards)])

    def _resumable_run(self, client) -> str | None:
        """The run of an earlier process of this job, when training resumes from one of its checkpoints and the
        run is in this store."""
        from jobs.train.checkpointing import checkpoint_root, latest_tag

        path = self.run_dir / RUN_FILE
        if self.config.train.resume == "never" or not path.is_file():
            return None
        if latest_tag(checkpoint_root(self.run_dir)) is None:
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if saved.get("tracking_uri") != self.uri:
            return None
        try:
            run = client.get_run(saved["run_id"])
        except Exception as error:  # noqa: BLE001
            if is_permanent(error):
                return None
            raise
        if run.info.lifecycle_stage == "deleted" or run.info.experiment_id != self.experiment_id:
            return None
        client.update_run(run.info.run_id, status="RUNNING")
        log.info("continuing MLflow run %s (resumed training)", run.info.run_id)
        return run.info.run_id

    def _queue_start_artifacts(self, ds_config: dict | None) -> None:
        files = {"config.yaml": dump_yaml(self.config)}
        if ds_config is not None:
            files["deepspeed_config.json"] = json.dumps(ds_config, indent=2, sort_keys=True)
        if self.dataset_info:
            files["dataset.json"] = json.dumps(self.dataset_info, indent=2, sort_keys=True)
        for name, text in files.items():
            path = self._staging / name
            path.write_text(text)
            self._outbox.put_task(f"log {name}", functools.partial(self._log_artifact, path, "config"))

    def _log_artifact(self, path: Path, folder: str) -> None:
        self._client.log_artifact(self.run_id, str(path), folder)

    def _export(self, tag_dir: Path, updates: int) -> None:
        """Export a checkpoint into a pending registration (local disk only) on the export thread, then queue the
        registrations; returns at once."""
        if updates in self._exported:
            return
        self._exported.add(updates)
        self._exports.submit(f"checkpoint {tag_dir}", functools.partial(self._export_now, tag_dir, updates),
                             functools.partial(self._outbox.put_task, RETRY_REGISTRATIONS, self._register_pending))

    def _export_now(self, tag_dir: Path, updates: int) -> None:
        """From `student.safetensors` only: reading DeepSpeed's shards (`sslam register --checkpoint DIR --trusted`,
        for older folders) never runs in a training process."""
        from jobs.mlops import registration

        registration.export_checkpoint(
            tag_dir,
            updates,
            self.run_dir,
            model_name=self.config.tracking.model_name,
            experiment=self.config.tracking.experiment,
            run_id=self.run_id,
            tracking_uri=self.uri,
            dataset_fingerprint=str(self.dataset_info.get("fingerprint", "")),
            config=self.config,
            aliases=self.config.tracking.aliases,
        )

    def _register_pending(self) -> None:
        from jobs.mlops import registry

        registry.register_pending(self.run_dir, run_id=self.run_id, client=self._client)
