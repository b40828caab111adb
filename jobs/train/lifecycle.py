"""The life of one training rank process (pre-training and fine-tuning alike): the entry point's argument
parsing, logging and exit codes (`job_main`), the run folder lock held around a trainer's run (`run_locked`),
the stop signal (SIGTERM/SIGINT checkpoint at the next update boundary), the guard stop (`TrainingStopped`),
the fail-fast deadline of a failed rank and the end of the process (`end_rank_process`)."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import threading
from contextlib import nullcontext

import torch.distributed as dist

from jobs.train import op_builds, run_lock
from jobs.train.config import Config, ConfigError, add_config_arguments, config_from_args
from model.checkpoint import CheckpointError

log = logging.getLogger("sslam.train")


class TrainingStopped(RuntimeError):
    """A guard stopped the run (collapse, non-finite loss): the message says why."""


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
