"""One ``corral bench`` run, end to end: the machine's facts and limits, each system's phases,
the JSON report (schema ``corral-bench/1``), and the ``corral bench`` command."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

import corral
from corral import __version__
from corral._cliutil import cli_state, corral_errors
from corral.errors import ConfigError
from corral.settings import is_loopback_url, redact_url
from corral.tools.bench.model import DEFAULT_REDIS_URL, FULL, QUICK, SCHEMA, SystemResult
from corral.tools.bench.orchestrator import Bench
from corral.tools.bench.report import corral_checks, markdown_report, print_report
from corral.tools.bench.systems import (
    CorralSystem,
    Environment,
    Suite,
    System,
    ensure_redis,
    package_version,
    redis_client,
)
from corral.tools.limits import measure_limits

CORRAL = Suite(
    systems={system.name: system for system in (CorralSystem("sqlite"), CorralSystem("bullmq"))},
    checks=corral_checks,
    packages=("redis", "hiredis", "bullmq"),
)
"""What ``corral bench`` measures: corral on each backend."""


def machine_info(env: Environment, packages: Sequence[str]) -> dict[str, Any]:
    """What the figures were measured on; ``packages``: the Python packages to name."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "redis": env.redis_version,
        "node": None,
        "packages": {name: package_version(name) for name in packages},
    }


def source_revision() -> dict[str, Any]:
    """corral's version and, when it runs from a git checkout, the commit and whether the
    package's files have uncommitted edits."""
    found: dict[str, Any] = {"version": __version__, "commit": None, "dirty": None}
    git = shutil.which("git")
    package = Path(corral.__file__).resolve().parent
    if git is None:
        return found

    def ask(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [git, "-C", str(package), *args], capture_output=True, text=True, timeout=10
        )

    try:
        # Installed inside some other repository (a venv in a checkout) is not a checkout.
        tracked = ask("ls-files", "--error-unmatch", "--", "__init__.py")
        if tracked.returncode != 0:
            return found
        head = ask("rev-parse", "--short=12", "HEAD")
        status = ask("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return found
    if head.returncode == 0:
        found["commit"] = head.stdout.strip()
        found["dirty"] = bool(status.stdout.strip())
    return found


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_bench(
    suite: Suite,
    *,
    quick: bool = False,
    systems: Sequence[str] | None = None,
    redis_url: str | None = None,
    console: Console | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """Run the benchmark of ``suite``'s ``systems`` (all by default) and return the report (what
    ``--json`` writes). ``processes``: worker processes of the systems that have them
    (corral's) in the processed phases, as ``corral worker --processes`` runs them."""
    plan = QUICK if quick else FULL
    chosen = [suite.systems[name] for name in suite.parse_systems(systems)]
    console = console or Console(stderr=True)
    url = redis_url or DEFAULT_REDIS_URL
    started_at = datetime.now(UTC)
    began = time.monotonic()
    redis_version = redis_error = None
    started_redis = False
    if any(system.uses_redis for system in chosen):
        redis_version, redis_error, started_redis = ensure_redis(url)
    env = Environment(redis_url=url, redis_version=redis_version, redis_error=redis_error)
    # Before the run: the load average says whether the machine was idle.
    machine = machine_info(env, suite.packages)
    for system in chosen:
        machine.update(system.runtimes())
    revision = source_revision()
    results: dict[str, SystemResult] = {}
    runnable: list[tuple[System, str]] = []
    for system in chosen:
        version: str | None
        reason: str | None
        if system.uses_redis and redis_error:
            version, reason = None, redis_error
        else:
            version, reason = system.availability(env)
        if version is None:
            results[system.name] = SystemResult(system.name, system.label, False, reason=reason)
        else:
            runnable.append((system, version))
            results[system.name] = SystemResult(system.name, system.label, True, version=version)
    steps = sum(5 + len(plan.processed) + int(system.flows) for system, _ in runnable)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    try:
        with _workdir() as workdir, progress:
            task = progress.add_task("starting", total=steps)
            progress.update(task, description="measuring the machine's limits")
            limits, limit_errors = measure_limits(
                workdir,
                redis_url=url if redis_version is not None else None,
                batch=plan.bulk_batch,
                duration_s=plan.limit_s,
            )
            bench = Bench(plan, env, workdir, progress, processes)
            try:
                for system, version in runnable:
                    results[system.name] = bench.run_system(system, version, task)
            finally:
                bench.close()
    finally:
        if started_redis:
            with contextlib.suppress(Exception):
                redis_client(url).shutdown(nosave=True)
    checks = suite.checks(results, limits, processes)
    load_before = machine["load_avg_1m"]
    machine["load_avg_1m"] = {"before": load_before, "after": round(os.getloadavg()[0], 2)}
    return {
        "schema": SCHEMA,
        "mode": plan.mode,
        "corral": revision,
        "date": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - began, 1),
        "machine": machine,
        "plan": {
            "enqueue_one": plan.enqueue_one,
            "enqueue_bulk": plan.enqueue_bulk,
            "bulk_batch": plan.bulk_batch,
            "processed": {str(c): n for c, n in plan.processed.items()},
            "rss_concurrency": plan.rss_concurrency,
            "warm_jobs": plan.warm_jobs,
            "idle_samples": plan.idle_samples,
            "idle_in_process_samples": plan.idle_in_process_samples,
            "idle_gap_ms": list(plan.idle_gap_ms),
            "max_phase_s": plan.max_phase_s,
            "worker_processes": processes,
            "flows": plan.flows,
            "flow_children": plan.flow_children,
            "flow_concurrency": plan.flow_concurrency,
        },
        "limits": limits,
        "limit_errors": limit_errors,
        "systems": {name: asdict(result) for name, result in results.items()},
        "checks": [asdict(check) for check in checks],
    }


def check_loopback(url: str) -> str:
    """``url`` if it names a Redis on this machine; a benchmark floods the Redis it is given."""
    if not is_loopback_url(url):
        raise ConfigError(
            f"corral bench only uses a Redis on this machine (127.0.0.1, ::1, localhost), "
            f"not {redact_url(url)}; pass --redis-url redis://127.0.0.1:6379/0"
        )
    return url


def bench_and_report(
    suite: Suite,
    *,
    quick: bool,
    systems: Sequence[str] | None,
    redis_url: str,
    processes: int,
    json_path: Path | None,
    markdown_path: Path | None,
) -> bool:
    """Run the benchmark, print its tables on stdout and write the files asked for; ``False``
    if a phase failed. Raises ConfigError for an unknown system or a Redis elsewhere."""
    chosen = suite.parse_systems(systems)
    if any(suite.systems[name].uses_redis for name in chosen):
        check_loopback(redis_url)
    report = run_bench(suite, quick=quick, systems=chosen, redis_url=redis_url, processes=processes)
    print_report(report, Console(highlight=False))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(markdown_report(report), encoding="utf-8")
    return not any(raw["errors"] for raw in report["systems"].values())


def bench_command(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option("--quick", help="A smoke run: small counts, done in seconds")
    ] = False,
    systems: Annotated[
        list[str] | None,
        typer.Option(
            "--systems",
            "-s",
            metavar="NAMES",
            help="Only these (comma-separated or repeated): "
            "corral-sqlite, corral-bullmq [default: both]",
        ),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", metavar="PATH", help="Also write the results as JSON to this file"),
    ] = None,
    markdown_path: Annotated[
        Path | None,
        typer.Option(
            "--markdown", metavar="PATH", help="Also write the tables as Markdown to this file"
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            metavar="URL",
            help="A Redis on 127.0.0.1 [default: global --redis-url, env, 127.0.0.1:6379]",
        ),
    ] = None,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            min=1,
            help="Worker processes in the processed phases, as "
            "`corral worker --processes N` runs them",
        ),
    ] = 1,
) -> None:
    """Load-test corral on SQLite and on BullMQ: enqueue and job rates, pickup, memory."""
    with corral_errors():
        ok = bench_and_report(
            CORRAL,
            quick=quick,
            systems=systems,
            redis_url=redis_url or cli_state(ctx).redis_url(),
            processes=processes,
            json_path=json_path,
            markdown_path=markdown_path,
        )
    if not ok:
        raise typer.Exit(1)
