"""The ledger of ``corral chaos``, read as the workers append to it: which jobs each worker
process started and finished (the lines :mod:`corral.tools._chaos_tasks` writes)."""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path


class Ledger:
    """Follows the ledger file as the workers append to it."""

    def __init__(self, path: Path, *, recent_window_s: float) -> None:
        self.path = path
        self.starts: collections.Counter[str] = collections.Counter()
        self.dones: collections.Counter[str] = collections.Counter()
        self.malformed = 0
        self._offset = 0
        self._partial = b""
        self._running: dict[int, collections.Counter[str]] = {}
        self._recent_done: dict[int, collections.deque[tuple[int, str]]] = {}
        self.window_ns = int(recent_window_s * 1e9)

    def poll(self) -> None:
        """Read the lines appended since the last call."""
        with open(self.path, "rb") as ledger:
            ledger.seek(self._offset)
            chunk = ledger.read()
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for raw in lines:
            self._add(raw)

    def _add(self, raw: bytes) -> None:
        parts = raw.decode("utf-8", "replace").split()
        if len(parts) != 5 or parts[0] not in ("start", "done"):
            self.malformed += 1
            return
        event, job_id, _attempt, pid_text, ns_text = parts
        try:
            pid, at_ns = int(pid_text), int(ns_text)
        except ValueError:
            self.malformed += 1
            return
        running = self._running.setdefault(pid, collections.Counter())
        if event == "start":
            self.starts[job_id] += 1
            running[job_id] += 1
            return
        self.dones[job_id] += 1
        running[job_id] -= 1
        if running[job_id] <= 0:
            del running[job_id]
        recent = self._recent_done.setdefault(pid, collections.deque())
        recent.append((at_ns, job_id))
        while recent and recent[0][0] < at_ns - self.window_ns:
            recent.popleft()

    def running(self, pid: int) -> set[str]:
        """Jobs ``pid`` started and has not finished, per the lines read so far."""
        return set(self._running.get(pid, ()))

    def recently_done(self, pid: int, since_ns: int) -> set[str]:
        """Jobs ``pid`` finished at or after ``since_ns`` (within the recent window)."""
        return {job for at_ns, job in self._recent_done.get(pid, ()) if at_ns >= since_ns}

    def done_pids(self, jobs: set[str]) -> dict[str, list[int]]:
        """The pids that finished each of ``jobs``, in ledger order (re-reads the file)."""
        found: dict[str, list[int]] = {job: [] for job in jobs}
        with open(self.path, "rb") as ledger:
            for raw in ledger:
                parts = raw.decode("utf-8", "replace").split()
                if len(parts) == 5 and parts[0] == "done" and parts[1] in found:
                    with contextlib.suppress(ValueError):
                        found[parts[1]].append(int(parts[3]))
        return found

    def forget(self, pid: int) -> None:
        """Drop what is known about a dead process (its pid may be reused)."""
        self._running.pop(pid, None)
        self._recent_done.pop(pid, None)
