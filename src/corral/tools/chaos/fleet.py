"""The worker processes of a ``corral chaos`` run: started, killed with SIGKILL, reaped and
stopped, each with exactly the run's settings."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from corral.settings import QueueSettings
from corral.tools.chaos.model import TASK_MODULE

logger = logging.getLogger("corral.chaos")


def settings_env(settings: QueueSettings) -> dict[str, str]:
    """Every field of ``settings`` as a ``QUEUE_*`` variable, so a worker gets exactly these."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            text = "none"
        elif isinstance(value, list):
            text = ",".join(value)
        else:
            text = str(value)
        env[f"QUEUE_{name.upper()}"] = text
    return env


class Fleet:
    """The worker processes of a run, one per slot."""

    def __init__(self, settings: QueueSettings, workdir: Path, size: int) -> None:
        self.command = [
            sys.executable,
            "-m",
            "corral.worker",
            TASK_MODULE,
            "--log-level",
            "warning",
            # A worker whose harness is gone (even killed outright) stops by itself.
            "--parent-pid",
            str(os.getpid()),
        ]
        base = {key: value for key, value in os.environ.items() if not key.startswith("QUEUE_")}
        self.env = {**base, **settings_env(settings)}
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self._logs: list[IO[bytes] | None] = [None] * size

    def start(self, slot: int) -> int:
        """Start the worker of ``slot``; return its pid."""
        log = self._logs[slot]
        if log is None:
            log = self._logs[slot] = open(self.workdir / f"worker-{slot + 1}.log", "ab")  # noqa: SIM115
        # Its own process group: a Ctrl-C reaches the harness, which stops the workers itself.
        proc = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        self.procs[slot] = proc
        return proc.pid

    def kill(self, slot: int) -> int:
        """SIGKILL the worker of ``slot`` and wait until it is gone; return its pid."""
        proc = self.procs[slot]
        assert proc is not None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        self.procs[slot] = None
        return proc.pid

    def reap(self) -> list[tuple[int, int, int]]:
        """``(slot, pid, exit code)`` of workers that exited on their own since the last call."""
        gone = []
        for slot, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is not None:
                gone.append((slot, proc.pid, proc.returncode))
                self.procs[slot] = None
        return gone

    def alive(self) -> list[int]:
        """The slots with a running worker."""
        return [slot for slot, proc in enumerate(self.procs) if proc is not None]

    def stop(self, grace_s: float) -> None:
        """SIGTERM every worker, wait ``grace_s`` plus a margin, then SIGKILL what is left."""
        running = [proc for proc in self.procs if proc is not None and proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s + 10.0
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait(30)
        self.procs = [None] * len(self.procs)
        for log in self._logs:
            if log is not None:
                log.close()
        self._logs = [None] * len(self._logs)
