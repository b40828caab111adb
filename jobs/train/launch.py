"""`sslam pretrain --ranks N`: runs the `deepspeed` launcher in a session of its own and owns that session.

The launcher, its per-node `deepspeed.launcher.launch` and the ranks (with their DataLoader workers) share the
session, so nothing of the job can outlive this process unnoticed:

* SIGTERM / SIGINT / SIGHUP here is forwarded to the ranks themselves, not to the launcher (which would
  SIGKILL them 30 s later and exit 1 whatever they did): each rank checkpoints at the next update boundary and
  exits 0, the launcher then exits 0. A second signal SIGKILLs every process of the session at once.
* When the launcher ends while ranks still run (it was killed), they are stopped the same way and waited for.
* Exit code: the launcher's; 0 as well when the launcher failed but rank 0 recorded in the run lock that every
  rank wrote the preemption checkpoint of this launch (the launcher itself exits 1 after a signal of its own);
  128 + signal after a second signal.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from jobs.train import run_lock

log = logging.getLogger("sslam.launch")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
RANK_FLAG = "--local_rank="
POLL_S = 0.5


class Launch:
    def __init__(self, command: list[str], output_dir: str | Path, launch_id: str):
        self.command, self.output_dir, self.launch_id = command, Path(output_dir), launch_id
        self.process: subprocess.Popen | None = None
        self.stopping = False
        self.killed: int | None = None

    def members(self) -> list[psutil.Process]:
        """Every live process of the launch's session (the launcher is its leader)."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.pid != os.getpid() and os.getsid(process.pid) == self.process.pid and (
                        process.status() != psutil.STATUS_ZOMBIE):
                    found.append(process)
            except (psutil.Error, OSError):
                continue
        return found

    def ranks(self) -> list[psutil.Process]:
        found = []
        for process in self.members():
            try:
                if any(part.startswith(RANK_FLAG) for part in process.cmdline()):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def stop_ranks(self, signum: int) -> None:
        self.stopping = True
        ranks = self.ranks()
        log.warning("%s: asking ranks %s to checkpoint and exit", signal.Signals(signum).name, [r.pid for r in ranks])
        for rank in ranks:
            try:
                rank.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
            except psutil.Error:
                continue

    def kill(self, signum: int) -> None:
        self.killed = signum
        members = self.members()
        log.error("second signal (%s): killing the job's %d processes now", signal.Signals(signum).name, len(members))
        for process in members:
            try:
                process.kill()
            except psutil.Error:
                continue

    def _on_signal(self, signum, frame) -> None:
        if self.stopping:
            self.kill(signum)
        else:
            self.stop_ranks(signum)

    def run(self) -> int:
        self.process = subprocess.Popen(self.command, start_new_session=True)
        previous = {number: signal.signal(number, self._on_signal) for number in FORWARDED}
        try:
            code = self.process.wait()
            if self.ranks() and not self.stopping and self.killed is None:
                log.warning("the launcher ended (exit %d) with ranks still running", code)
                self.stop_ranks(signal.SIGTERM)
            while self.members():
                time.sleep(POLL_S)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        return self._exit_code(code)

    def _exit_code(self, code: int) -> int:
        if self.killed is not None:
            return 128 + self.killed
        if code == 0:
            return 0
        holder = run_lock.read_holder(self.output_dir)
        if holder.get("launch_id") == self.launch_id and holder.get("state") == "preempted":
            log.info("every rank wrote the preemption checkpoint at update %s (launcher exit %d)",
                     holder.get("update"), code)
            return 0
        return code if code > 0 else 128 - code
