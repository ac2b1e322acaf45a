"""The orchestrator of ``corral bench``: :class:`Bench` starts each system's runner processes,
drives its phases on fresh queues and collects one :class:`SystemResult` per system."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import random
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from rich.progress import (
    Progress,
)

import corral
from corral.errors import BenchError, Unsupported
from corral.tools.bench.model import Data, Memory, Pickup, Plan, SystemResult, now_us, percentile
from corral.tools.bench.systems import CorralSystem, Environment, System, redis_client


class _Child:
    """A runner subprocess; a thread reads its stdout so that every read can time out."""

    def __init__(self, command: Sequence[str], *, cwd: Path, env: dict[str, str], log: Path):
        self.command = list(command)
        self.log = log
        self._log_file: IO[bytes] = open(log, "wb")  # noqa: SIM115  (closed in finish)
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            cwd=cwd,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._lines.put(raw.decode("utf-8", "replace"))
        self._lines.put(None)

    def stderr_tail(self, lines: int = 6) -> str:
        with contextlib.suppress(OSError):
            self._log_file.flush()
            text = self.log.read_text("utf-8", "replace").strip().splitlines()
            return " | ".join(text[-lines:])
        return ""

    def send(self, command: Data) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(command) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise BenchError(f"runner exited early: {self.stderr_tail()}") from exc

    def receive(self, timeout_s: float) -> Data:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"no answer within {timeout_s:.0f}s") from None
            if line is None:
                code = self.process.wait()
                raise BenchError(f"runner exited with {code}: {self.stderr_tail()}")
            if line.lstrip().startswith("{"):
                answer: Data = json.loads(line)
                return answer

    def call(self, command: Data, timeout_s: float) -> Data:
        self.send(command)
        answer = self.receive(timeout_s)
        if not answer.get("ok"):
            error = str(answer.get("error", "failed"))
            raise Unsupported(error) if answer.get("unsupported") else BenchError(error)
        return answer

    def finish(self, timeout_s: float = 30.0) -> None:
        """Close stdin (the runner's signal to stop), wait, kill if it does not exit."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        self._log_file.close()


def pickup_of(latencies_ms: Sequence[float]) -> Pickup:
    """Summarise idle pickup samples."""
    return Pickup(
        samples=len(latencies_ms),
        p50_ms=round(statistics.median(latencies_ms), 3),
        p99_ms=round(percentile(latencies_ms, 0.99), 3),
        max_ms=round(max(latencies_ms), 3),
    )


class Bench:
    """Runs the phases of each system and collects a :class:`SystemResult` per system."""

    def __init__(
        self,
        plan: Plan,
        env: Environment,
        workdir: Path,
        progress: Progress,
        processes: int = 1,
    ) -> None:
        self.plan = plan
        self.processes = processes
        self.env = env
        self.workdir = workdir
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:8]
        self.children: list[_Child] = []
        self._redis: Any = None
        self._child_env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUE_")}
        self._child_env.setdefault("PYTHONUNBUFFERED", "1")
        # The runners import the corral this process imported (a checkout's src, for one).
        corral_home = str(Path(corral.__file__).resolve().parents[1])
        self._child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (corral_home, os.environ.get("PYTHONPATH", "")) if p
        )

    # Children -----------------------------------------------------------------------------

    def _command(self, system: System, role: str, options: dict[str, Any]) -> list[str]:
        command = [*system.runner(role), "--redis", self.env.redis_url]
        for key, value in options.items():
            if value is not None:
                command += [f"--{key.replace('_', '-')}", str(value)]
        return command

    def spawn(self, system: System, role: str, **options: Any) -> _Child:
        """Start a runner; every runner started here is ended by :meth:`close`."""
        log = self.workdir / f"{system.name}-{role}-{len(self.children)}.log"
        child = _Child(
            self._command(system, role, options), cwd=self.workdir, env=self._child_env, log=log
        )
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.kill()
            with contextlib.suppress(Exception):
                child.finish(5)
        self.children.clear()
        if self._redis is not None:
            self._redis.close()

    # Places -------------------------------------------------------------------------------

    def place(self, system: System, phase: str) -> dict[str, Any]:
        """A fresh queue (and SQLite file) for one phase of one system."""
        name = f"corral-bench-{self.run_id}-{system.name}-{phase}"
        path = None
        if not system.uses_redis:
            folder = self.workdir / system.name
            folder.mkdir(exist_ok=True)
            path = str(folder / f"{phase}.db")
        return {"queue": name, "path": path}

    def discard(self, system: System, where: dict[str, Any]) -> None:
        """Delete what a phase left: the Redis keys of its queue, or its SQLite files."""
        if system.uses_redis:
            if self._redis is None:
                self._redis = redis_client(self.env.redis_url)
            pattern = f"bull:{where['queue']}:*"
            batch: list[bytes] = []
            for key in self._redis.scan_iter(match=pattern, count=2000):
                batch.append(key)
                if len(batch) >= 2000:
                    self._redis.unlink(*batch)
                    batch.clear()
            if batch:
                self._redis.unlink(*batch)
        elif where["path"]:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(where["path"] + suffix)

    # Phases -------------------------------------------------------------------------------

    def run_system(self, system: System, version: str, task: Any) -> SystemResult:
        result = SystemResult(system.name, system.label, True, version=version)
        plan = self.plan
        phases: list[tuple[str, Callable[[_Child], None]]] = [
            ("enqueue one by one", lambda p: self._enqueue(system, p, result, bulk=False)),
            ("enqueue in bulk", lambda p: self._enqueue(system, p, result, bulk=True)),
        ]
        for concurrency in plan.processed:
            phases.append(
                (
                    f"processed at concurrency {concurrency}",
                    functools.partial(
                        self._processed, system, result=result, concurrency=concurrency
                    ),
                )
            )
        if isinstance(system, CorralSystem):  # the loop corral's producers run on
            phases.append(
                ("enqueue under load", lambda p: self._enqueue_under_load(system, p, result))
            )
        phases.append(("idle pickup across processes", lambda p: self._pickup(system, p, result)))
        phases.append(("idle pickup in process", lambda p: self._pickup_in_process(system, result)))
        if system.flows:
            phases.append(("flows", lambda p: self._flows(system, p, result)))
        producer = self.spawn(system, "producer")
        try:
            for title, phase in phases:
                self.progress.update(task, description=f"{system.name}: {title}")
                began = time.monotonic()
                try:
                    phase(producer)
                except Unsupported as exc:
                    result.notes.append(f"{title}: {exc}")
                except Exception as exc:
                    result.errors.append(f"{title}: {exc}")
                result.phase_s[title] = round(time.monotonic() - began, 1)
                self.progress.advance(task)
        finally:
            producer.finish()
        return result

    def _enqueue_timeout(self, count: int) -> float:
        return self.plan.max_phase_s + count / 500

    def _enqueue(
        self, system: System, producer: _Child, result: SystemResult, *, bulk: bool
    ) -> None:
        plan = self.plan
        count = plan.enqueue_bulk if bulk else plan.enqueue_one
        where = self.place(system, "bulk" if bulk else "one")
        try:
            answer = producer.call(
                {"op": "enqueue", **where, "count": count, "batch": plan.bulk_batch if bulk else 0},
                self._enqueue_timeout(count),
            )
        finally:
            with contextlib.suppress(BenchError):
                producer.call({"op": "close", **where}, 30)
            self.discard(system, where)
        rate = count / float(answer["elapsed_s"])
        if bulk:
            result.enqueue_bulk_per_s = round(rate, 1)
        else:
            result.enqueue_one_per_s = round(rate, 1)

    def _processed(
        self, system: System, producer: _Child, result: SystemResult, concurrency: int
    ) -> None:
        plan = self.plan
        count = plan.processed[concurrency]
        where = self.place(system, f"c{concurrency}")
        shared = self.processes > 1 and system.multi_process
        # Several processes each stop after their share, and the jobs a process runs while it
        # stops are more than its share: extra jobs keep the last process from running dry.
        extra = self.processes * max(concurrency, 100) * 2 if shared else 0
        try:
            producer.call(
                {
                    "op": "enqueue",
                    **where,
                    "count": count + extra,
                    "batch": plan.bulk_batch,
                    "prefill": True,
                },
                self._enqueue_timeout(count + extra),
            )
            producer.call({"op": "close", **where}, 30)
            if shared:
                answer = self._processed_by_processes(system, where, count, concurrency)
            else:
                worker = self.spawn(
                    system,
                    "work",
                    **where,
                    count=count,
                    concurrency=concurrency,
                    max_s=plan.max_phase_s,
                    warm=plan.warm_jobs,
                )
                try:
                    answer = worker.receive(plan.max_phase_s + 60)
                finally:
                    worker.finish()
        finally:
            self.discard(system, where)
        if not answer.get("ok"):
            raise BenchError(str(answer.get("error")))
        jobs, elapsed_s = int(answer["jobs"]), float(answer["elapsed_s"])
        if jobs < 2 or elapsed_s <= 0:
            raise BenchError(f"the worker processed {jobs} job(s)")
        result.processed_per_s[str(concurrency)] = round((jobs - 1) / elapsed_s, 1)
        if answer.get("timed_out"):
            result.notes.append(
                f"concurrency {concurrency}: stopped after {plan.max_phase_s:.0f}s "
                f"({jobs} of {count} jobs)"
            )
        if concurrency == plan.rss_concurrency:
            rss = answer["rss_kb"]
            result.rss = Memory(
                jobs=jobs,
                start_kb=int(rss["start"]),
                warm_kb=int(rss["warm"]),
                end_kb=int(rss["end"]),
                peak_kb=int(answer.get("hwm_kb") or rss["end"]),
            )

    def _processed_by_processes(
        self, system: System, where: dict[str, Any], count: int, concurrency: int
    ) -> Data:
        """``corral worker --processes N``: N worker processes at ``concurrency`` each drain the
        queue together, each its share of ``count``; they start at the same clock time (after
        their imports), and the time is from the first job of any to the last job of any."""
        plan = self.plan
        start_at_us = now_us() + 3_000_000
        shares = [count // self.processes] * self.processes
        shares[0] += count - sum(shares)
        workers = [
            self.spawn(
                system,
                "work",
                **where,
                count=share,
                concurrency=concurrency,
                max_s=plan.max_phase_s,
                warm=min(plan.warm_jobs, share),
                start_at_us=start_at_us,
            )
            for share in shares
        ]
        try:
            answers = [worker.receive(plan.max_phase_s + 60) for worker in workers]
        finally:
            for worker in workers:
                worker.finish()
        for answer in answers:
            if not answer.get("ok"):
                return answer
        first_us = min(int(a["first_us"]) for a in answers)
        last_us = max(int(a["last_us"]) for a in answers)
        return {
            **answers[0],
            "jobs": sum(int(a["jobs"]) for a in answers),
            "timed_out": any(a.get("timed_out") for a in answers),
            "elapsed_s": (last_us - first_us) / 1e6,
        }

    def _flows(self, system: System, producer: _Child, result: SystemResult) -> None:
        plan = self.plan
        where = self.place(system, "flows")
        jobs = plan.flows * (plan.flow_children + 1)
        try:
            added = producer.call(
                {
                    "op": "flow",
                    **where,
                    "flows": plan.flows,
                    "children": plan.flow_children,
                },
                self._enqueue_timeout(jobs),
            )
            producer.call({"op": "close", **where}, 30)
            worker = self.spawn(
                system,
                "flow-work",
                **where,
                flows=plan.flows,
                count=plan.flow_children,
                concurrency=plan.flow_concurrency,
                max_s=plan.max_phase_s,
            )
            try:
                answer = worker.receive(plan.max_phase_s + 60)
            finally:
                worker.finish()
        finally:
            self.discard(system, where)
        if not answer.get("ok"):
            raise BenchError(str(answer.get("error")))
        children, elapsed_s = int(answer["children"]), float(answer["elapsed_s"])
        if answer.get("timed_out") or int(answer["parents"]) < plan.flows:
            raise BenchError(
                f"{answer['parents']} of {plan.flows} parents ran within {plan.max_phase_s:.0f}s "
                f"({children} children)"
            )
        result.flow_enqueue_per_s = round(int(added["jobs"]) / float(added["elapsed_s"]), 1)
        result.flow_children_per_s = round((children - 1) / elapsed_s, 1)
        result.flow_release = pickup_of([float(v) for v in answer["releases_ms"]])

    def _gap_s(self) -> float:
        low, high = self.plan.idle_gap_ms
        return random.uniform(low, high) / 1000

    def _enqueue_under_load(self, system: System, producer: _Child, result: SystemResult) -> None:
        """Enqueue one by one from several tasks while a worker process drains the queue, and
        measure the producer's event-loop lag meanwhile."""
        plan = self.plan
        count = plan.under_load_jobs
        where = self.place(system, "load")
        worker = self.spawn(
            system,
            "work",
            **where,
            count=count,
            concurrency=10,
            max_s=plan.max_phase_s,
            warm=min(plan.warm_jobs, count // 2),
        )
        try:
            answer = producer.call(
                {
                    "op": "enqueue_under_load",
                    **where,
                    "count": count,
                    "tasks": plan.under_load_tasks,
                },
                self._enqueue_timeout(count),
            )
            drained = worker.receive(plan.max_phase_s + 60)
        finally:
            worker.finish()
            with contextlib.suppress(BenchError):
                producer.call({"op": "close", **where}, 30)
            self.discard(system, where)
        if not drained.get("ok") or drained.get("timed_out"):
            result.notes.append(
                f"enqueue under load: the worker drained {drained.get('jobs')} jobs"
            )
        result.enqueue_under_load_per_s = round(count / float(answer["elapsed_s"]), 1)
        p50, p99, worst = (round(float(v), 2) for v in answer["lag_ms"])
        result.loop_lag = Pickup(int(answer["samples"]), p50, p99, worst)

    def _pickup(self, system: System, producer: _Child, result: SystemResult) -> None:
        plan = self.plan
        where = self.place(system, "idle")
        worker = self.spawn(system, "idle-worker", **where)
        latencies: list[float] = []
        try:
            ready = worker.receive(60)
            if not ready.get("ready"):
                raise BenchError(f"unexpected answer from the idle worker: {ready}")
            time.sleep(0.3)
            for index in range(plan.idle_samples + 1):
                time.sleep(self._gap_s())
                producer.call({"op": "probe", **where}, 30)
                answer = worker.receive(30)
                if index > 0:
                    latencies.append(int(answer["latency_us"]) / 1000)
        finally:
            worker.finish()
            with contextlib.suppress(BenchError):
                producer.call({"op": "close", **where}, 30)
            self.discard(system, where)
        result.pickup["cross_process"] = pickup_of(latencies)

    def _pickup_in_process(self, system: System, result: SystemResult) -> None:
        plan = self.plan
        where = self.place(system, "idle-in-process")
        low, high = plan.idle_gap_ms
        runner = self.spawn(
            system,
            "idle",
            **where,
            samples=plan.idle_in_process_samples,
            gap_min_ms=low,
            gap_max_ms=high,
        )
        try:
            answer = runner.receive(plan.max_phase_s + 60)
        finally:
            runner.finish()
            self.discard(system, where)
        if not answer.get("ok"):
            raise BenchError(str(answer.get("error")))
        result.pickup["in_process"] = pickup_of([float(v) for v in answer["latencies_ms"]])
