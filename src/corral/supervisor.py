"""Several worker processes under one supervisor (``corral worker --processes N``).

The supervisor restarts a process that dies (waiting longer after each quick death, so a crash
loop does not spin), forwards SIGTERM/SIGINT to them and exits once they have.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

logger = logging.getLogger("corral.worker")

HARD_EXIT_DEADLINE_S = 10.0
"""After a second signal, how long a process may take before it is killed."""
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
EXIT_OK = 0
EXIT_ERROR = 1


@dataclass(slots=True)
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    done: bool = False


class Supervisor:
    """Run ``processes`` copies of a worker command; restart them, forward signals to them.

    The command starts with SIGTERM and SIGINT blocked and must unblock them once it can
    handle them (``python -m corral.worker`` does).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        processes: int,
        env: Mapping[str, str] | None = None,
        burst: bool = False,
        restart_delay_s: float = 0.5,
        max_restart_delay_s: float = 30.0,
        healthy_after_s: float = 10.0,
        kill_after_s: float = HARD_EXIT_DEADLINE_S,
    ) -> None:
        self.command = list(command)
        self.env = dict(env) if env is not None else None
        self.burst = burst
        self.restart_delay_s = restart_delay_s
        self.max_restart_delay_s = max_restart_delay_s
        self.healthy_after_s = healthy_after_s
        self.kill_after_s = kill_after_s
        self.slots = [_Slot(i) for i in range(processes)]
        self._signals: list[int] = []

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # the loop acts on it; a handler does nothing else

    def run(self) -> int:
        """Supervise until the children exit after a signal (or, with burst, drain); return the
        exit code: 0 if every child exited 0 at the end, else 1 (``128 + signal`` after a
        second signal)."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        for slot in self.slots:
            self._start(slot)
        signals_seen = 0
        forwarded: set[int] = set()
        hard_signal: int | None = None
        kill_at: float | None = None
        final_codes: dict[int, int] = {}
        while True:
            while self._signals:
                signum = self._signals.pop(0)
                signals_seen += 1
                forwarded.add(signum)
                name = signal.Signals(signum).name
                if signals_seen == 1:
                    logger.info("%s received: stopping the worker processes", name)
                elif signals_seen == 2:
                    logger.warning("%s received again: the worker processes exit at once", name)
                    hard_signal = signum
                    kill_at = time.monotonic() + self.kill_after_s
                for slot in self.slots:
                    if slot.process is not None:
                        with contextlib.suppress(ProcessLookupError):
                            slot.process.send_signal(signum)
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is None:
                    continue
                code = slot.process.poll()
                if code is None:
                    continue
                pid = slot.process.pid
                slot.process = None
                # A child that had not yet installed its handlers dies of the forwarded signal
                # itself; it held no job, so for a stop that is as good as a clean exit.
                final_codes[slot.index] = 0 if -code in forwarded else code
                if signals_seen:
                    logger.info(
                        "worker process %d (pid %d) exited: %s", slot.index + 1, pid, _how(code)
                    )
                elif self.burst and code == 0:
                    slot.done = True
                    logger.info("worker process %d (pid %d) drained the queue", slot.index + 1, pid)
                else:
                    slot.quick_deaths = (
                        0 if now - slot.started_at >= self.healthy_after_s else slot.quick_deaths
                    )
                    delay = min(
                        self.restart_delay_s * 2**slot.quick_deaths, self.max_restart_delay_s
                    )
                    slot.quick_deaths += 1
                    slot.restart_at = now + delay
                    logger.warning(
                        "worker process %d (pid %d) %s; restarting it in %.2fs",
                        slot.index + 1,
                        pid,
                        _how(code),
                        delay,
                    )
            alive = [s for s in self.slots if s.process is not None]
            if signals_seen and not alive:
                break
            if self.burst and not signals_seen and all(s.done for s in self.slots):
                break
            if not signals_seen:
                for slot in self.slots:
                    if slot.restart_at is not None and now >= slot.restart_at:
                        self._start(slot)
            if kill_at is not None and now >= kill_at:
                for slot in alive:
                    logger.error(
                        "worker process %d (pid %d) still running; killing it",
                        slot.index + 1,
                        slot.process.pid if slot.process else -1,
                    )
                    if slot.process is not None:
                        slot.process.kill()
                kill_at = None
            time.sleep(0.05)
        if hard_signal is not None:
            return 128 + hard_signal
        return EXIT_OK if all(code == 0 for code in final_codes.values()) else EXIT_ERROR

    def _start(self, slot: _Slot) -> None:
        slot.restart_at = None
        # A process group of its own: a terminal's Ctrl-C reaches only the supervisor, which
        # forwards it once; otherwise every child would see it twice and exit at once.
        # The child inherits a mask that blocks SIGTERM/SIGINT, so a signal forwarded while it
        # starts up waits until its worker can handle it instead of killing it half-started.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            slot.process = subprocess.Popen(self.command, env=self.env, process_group=0)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        slot.started_at = time.monotonic()
        logger.info(
            "worker process %d/%d started (pid %d)",
            slot.index + 1,
            len(self.slots),
            slot.process.pid,
        )


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
