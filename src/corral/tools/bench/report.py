"""The report of ``corral bench``: corral's targets and its ratios to the machine's limits, the
tables printed on the terminal, the Markdown, and a saved JSON report read back."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from corral.tools.bench.model import (
    BUSY_LOAD,
    FULL,
    QUICK,
    Check,
    Memory,
    Pickup,
    Plan,
    SystemResult,
)
from corral.tools.limits import LIMIT_LABELS


def _fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _fmt_ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def available(results: dict[str, SystemResult], system: str) -> SystemResult | None:
    """The result of ``system`` if it was measured in this run."""
    found = results.get(system)
    return found if found is not None and found.available else None


def at_least(name: str, value: float | None, goal: float, unit: str) -> Check | None:
    """A target "``value`` >= ``goal``"; ``None`` without a value."""
    if value is None:
        return None
    return Check(name, f"{value:,.0f}{unit}", f">= {goal:,.0f}{unit}", value >= goal, {"": value})


def at_most_ms(name: str, value_ms: float, goal_ms: float) -> Check:
    """A target "``value_ms`` <= ``goal_ms``"."""
    return Check(
        name, f"{_fmt_ms(value_ms)} ms", f"<= {goal_ms:g} ms", value_ms <= goal_ms, {"": value_ms}
    )


def ratio(
    name: str, mine: dict[str, float], theirs: dict[str, float], goal: float | None
) -> Check | None:
    """``mine / theirs`` for each key both have (concurrency, or ``""`` for one figure): a
    target ">= ``goal``" for every ratio, or a reference without one; ``None`` without ratios."""
    ratios = {k: mine[k] / theirs[k] for k in mine if k in theirs and theirs[k] > 0}
    if not ratios:
        return None
    measured = " · ".join(
        (f"c={k} " if k else "") + _fmt_ratio(v) for k, v in sorted(ratios.items(), key=_key)
    )
    met = None if goal is None else all(v >= goal for v in ratios.values())
    target = "reference" if goal is None else f">= {goal:g}x"
    return Check(name, measured, target, met, {k: round(v, 3) for k, v in ratios.items()})


def one_figure(value: float | None) -> dict[str, float]:
    """A single figure in the form :func:`ratio` takes."""
    return {} if value is None else {"": value}


def of_limit(limits: dict[str, float], name: str, keys: Iterable[str] = ("",)) -> dict[str, float]:
    """The limit ``name`` under each of ``keys``, in the form :func:`ratio` takes."""
    value = limits.get(name)
    return {} if value is None else {key: value for key in keys}


def best_processed(result: SystemResult) -> tuple[str, dict[str, float]]:
    """The best processed rate of ``result`` (``c=N`` and the figure), for one ratio."""
    if not result.processed_per_s:
        return "", {}
    best_c, best = max(result.processed_per_s.items(), key=lambda kv: kv[1])
    return f" (best: c={best_c})", {"": best}


SQLITE_SHARE_GOALS = {"enqueue_one": 0.3, "enqueue_bulk": 0.12, "processed": 0.2}
"""corral on SQLite as a share of what raw SQLite does on the same machine in the same run:
enqueues one by one and processed jobs against inserts of one row per transaction, bulk
enqueues against inserts batched as the bulk phase batches. They are the former absolute
targets (15,000, 100,000 and 10,000 per second) over the limits measured on the 2-core machine
they were set on (about 50,000 inserts/s one per transaction, 800,000 batched)."""


def corral_checks(
    results: dict[str, SystemResult], limits: dict[str, float], processes: int = 1
) -> list[Check]:
    """corral's own targets and its shares of the machine's limits, from this run's figures.

    Throughput targets are ratios to what the hardware allows in the same run, so they hold
    on any machine; the idle pickup targets stay in milliseconds, since a setting
    (``poll_interval_s``) and a blocking pop bound them, not the hardware.
    """
    checks: list[Check | None] = []
    per_row = "raw SQLite inserts, one per transaction"
    sqlite = available(results, "corral-sqlite")
    if sqlite is not None:
        goals = SQLITE_SHARE_GOALS
        best_c, best = best_processed(sqlite)
        checks += [
            ratio(
                f"corral-sqlite enqueue one by one / {per_row}",
                one_figure(sqlite.enqueue_one_per_s),
                of_limit(limits, "sqlite_insert_autocommit_per_s"),
                goals["enqueue_one"],
            ),
            ratio(
                "corral-sqlite enqueue in bulk / raw SQLite inserts, batched",
                one_figure(sqlite.enqueue_bulk_per_s),
                of_limit(limits, "sqlite_insert_batched_per_s"),
                goals["enqueue_bulk"],
            ),
            ratio(
                f"corral-sqlite processed{best_c} / {per_row}",
                best,
                of_limit(limits, "sqlite_insert_autocommit_per_s"),
                goals["processed"],
            ),
        ]
        cross = sqlite.pickup.get("cross_process")
        if cross is not None:
            checks.append(
                at_most_ms("corral-sqlite idle pickup p99, across processes", cross.p99_ms, 50)
            )
    bullmq = available(results, "corral-bullmq")
    if bullmq is not None:
        best_c, best = best_processed(bullmq)
        checks += [
            ratio(
                "corral-bullmq enqueue one by one / Redis no-op Lua calls, one at a time",
                one_figure(bullmq.enqueue_one_per_s),
                of_limit(limits, "redis_lua_one_per_s"),
                None,
            ),
            ratio(
                f"corral-bullmq processed{best_c} / Redis no-op Lua calls, pipelined",
                best,
                of_limit(limits, "redis_lua_pipelined_per_s"),
                None,
            ),
        ]
        cross = bullmq.pickup.get("cross_process")
        if cross is not None:
            checks.append(
                at_most_ms("corral-bullmq idle pickup p99, across processes", cross.p99_ms, 10)
            )
    return [check for check in checks if check is not None]


def _key(item: tuple[str, float]) -> int:
    return int(item[0]) if item[0].isdigit() else 0


def figure_rows(results: dict[str, SystemResult], plan: Plan) -> list[tuple[str, list[str]]]:
    """The figures as (measurement, one cell per system) rows."""
    rss_jobs = plan.processed[plan.rss_concurrency]
    rows: list[tuple[str, Callable[[SystemResult], str]]] = [
        ("enqueue 1 by 1 /s", lambda r: _fmt_rate(r.enqueue_one_per_s)),
        (f"enqueue bulk /s (x{plan.bulk_batch})", lambda r: _fmt_rate(r.enqueue_bulk_per_s)),
    ]
    for c in plan.processed:
        rows.append((f"processed /s c={c}", functools.partial(_fmt_processed, c)))
    rows.append(
        (
            f"enqueue 1 by 1 /s, {plan.under_load_tasks} tasks, worker draining",
            lambda r: _fmt_rate(r.enqueue_under_load_per_s),
        )
    )
    rows.append(
        (
            "producer loop lag p99 / max ms",
            lambda r: (
                f"{_fmt_ms(r.loop_lag.p99_ms)} / {_fmt_ms(r.loop_lag.max_ms)}"
                if r.loop_lag
                else "—"
            ),
        )
    )
    for kind, where in (("cross_process", "x-process"), ("in_process", "in-process")):
        rows.append((f"pickup p50 ms {where}", functools.partial(_fmt_pickup, kind, "p50")))
        rows.append((f"pickup p99 ms {where}", functools.partial(_fmt_pickup, kind, "p99")))
    rows.append(("worker RSS MB warm", lambda r: _fmt_mb(r.rss.warm_kb if r.rss else None)))
    rows.append(
        (f"worker RSS MB {rss_jobs:,} jobs", lambda r: _fmt_mb(r.rss.end_kb if r.rss else None))
    )
    shape = f"{plan.flows} flows of {plan.flow_children:,}"
    rows.append((f"flow enqueue jobs /s ({shape})", lambda r: _fmt_rate(r.flow_enqueue_per_s)))
    rows.append(
        (f"flow children /s c={plan.flow_concurrency}", lambda r: _fmt_rate(r.flow_children_per_s))
    )
    rows.append(("flow parent release p50 ms", functools.partial(_fmt_release, "p50")))
    rows.append(("flow parent release max ms", functools.partial(_fmt_release, "max")))
    return [
        (title, [cell(r) if r.available else "not installed" for r in results.values()])
        for title, cell in rows
    ]


def results_table(results: dict[str, SystemResult], plan: Plan) -> Table:
    """The figures: one column per system, one row per measurement."""
    table = Table(title=f"corral bench ({plan.mode} run)", title_justify="left")
    table.add_column("")
    for system in results:
        table.add_column(system, justify="right")
    for title, cells in figure_rows(results, plan):
        table.add_row(title, *cells)
    return table


def _packages_text(machine: dict[str, Any]) -> str:
    packages = machine.get("packages") or {}
    found = [f"{name} {version}" for name, version in packages.items() if version]
    return f" ({', '.join(found)})" if found else ""


def _revision_text(report: dict[str, Any]) -> str:
    corral = report.get("corral") or {}
    text = f"corral {corral.get('version', '?')}"
    if corral.get("commit"):
        text += f" at {corral['commit']}" + (
            " with uncommitted edits in src" if corral["dirty"] else ""
        )
    return text


def markdown_report(report: dict[str, Any]) -> str:
    """The tables of a report as Markdown (the form docs/performance.md keeps them in)."""
    results, plan = report_from_json(report)
    machine = report["machine"]
    load = machine["load_avg_1m"]
    processes = int(report["plan"].get("worker_processes", 1))
    how = f" with {processes} worker processes per corral system" if processes > 1 else ""
    node = f", Node {machine['node']}" if machine.get("node") else ""
    lines = [
        f"{report['date']}, {report['mode']} run{how} of {_revision_text(report)}, "
        f"{machine['cpus']} cores ({machine['cpu']}), "
        f"{machine['os']}, Python {machine['python']}, SQLite {machine['sqlite']}, "
        f"Redis {machine['redis'] or '-'}{node}{_packages_text(machine)}; "
        f"load average {load['before']} before, {load['after']} after; {report['duration_s']}s.",
        "",
        "| | " + " | ".join(results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    lines.append(
        "| version | "
        + " | ".join(
            (r.version or r.reason or "") if r.available else "not installed"
            for r in results.values()
        )
        + " |"
    )
    for title, cells in figure_rows(results, plan):
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    limits = report.get("limits") or {}
    if limits:
        lines += ["", "| the machine's limits (this run) | per second |", "|---|---:|"]
        lines += [f"| {LIMIT_LABELS.get(k, k)} | {_fmt_rate(v)} |" for k, v in limits.items()]
    checks = [Check(**raw) for raw in report["checks"]]
    if checks:
        lines += ["", "| check | measured | target | |", "|---|---:|---:|:---:|"]
        for check in checks:
            mark = "" if check.met is None else ("ok" if check.met else "**no**")
            lines.append(f"| {check.check} | {check.measured} | {check.target} | {mark} |")
    return "\n".join(lines) + "\n"


def _fmt_processed(concurrency: int, result: SystemResult) -> str:
    return _fmt_rate(result.processed_per_s.get(str(concurrency)))


def _fmt_pickup(kind: str, which: str, result: SystemResult) -> str:
    found = result.pickup.get(kind)
    if found is None:
        return "—"
    return _fmt_ms(found.p50_ms if which == "p50" else found.p99_ms)


def _fmt_release(which: str, result: SystemResult) -> str:
    found = result.flow_release
    if found is None:
        return "—"
    return _fmt_ms(found.p50_ms if which == "p50" else found.max_ms)


def _fmt_mb(kb: int | None) -> str:
    return "—" if kb is None else f"{kb / 1024:.1f}"


def limits_table(limits: dict[str, float]) -> Table:
    """What the machine allows, measured in the same run."""
    table = Table(title="the machine's limits (this run)", title_justify="left")
    table.add_column("")
    table.add_column("per second", justify="right")
    for name, value in limits.items():
        table.add_row(LIMIT_LABELS.get(name, name), _fmt_rate(value))
    return table


def checks_table(checks: Sequence[Check]) -> Table:
    """Targets and ratios."""
    table = Table(title="targets and ratios (this run)", title_justify="left")
    table.add_column("check")
    table.add_column("measured", justify="right")
    table.add_column("target", justify="right")
    table.add_column("", justify="center")
    for check in checks:
        mark = "" if check.met is None else ("[green]ok[/green]" if check.met else "[red]no[/red]")
        table.add_row(check.check, check.measured, check.target, mark)
    return table


def report_from_json(report: dict[str, Any]) -> tuple[dict[str, SystemResult], Plan]:
    """The results and plan of a report (to print a table of a saved run)."""
    plan = QUICK if report.get("mode") == "quick" else FULL
    results: dict[str, SystemResult] = {}
    for name, raw in report["systems"].items():
        values = dict(raw)
        values["pickup"] = {k: Pickup(**v) for k, v in (values.get("pickup") or {}).items()}
        values["rss"] = Memory(**values["rss"]) if values.get("rss") else None
        values["loop_lag"] = Pickup(**values["loop_lag"]) if values.get("loop_lag") else None
        release = values.get("flow_release")
        values["flow_release"] = Pickup(**release) if release else None
        results[name] = SystemResult(**values)
    return results, plan


def print_report(report: dict[str, Any], console: Console) -> None:
    """The tables of a report, with the errors and notes under them."""
    results, plan = report_from_json(report)
    machine = report["machine"]
    load = machine["load_avg_1m"]
    node = f"Node {machine['node']} · " if machine.get("node") else ""
    console.print(
        f"{report['date']} · {_revision_text(report)} · {machine['cpus']} cores "
        f"({machine['cpu']}) · Python "
        f"{machine['python']} · SQLite {machine['sqlite']} · Redis {machine['redis'] or '—'} · "
        f"{node}{report['duration_s']}s · load average "
        f"{load['before']} before, {load['after']} after",
        markup=False,
        highlight=False,
    )
    if isinstance(load["before"], float | int) and load["before"] > BUSY_LOAD:
        console.print(
            f"note: the machine was busy before the run (load average {load['before']}); "
            "figures from a busy machine do not compare with others",
            markup=False,
            highlight=False,
        )
    console.print(results_table(results, plan))
    limits = report.get("limits") or {}
    if limits:
        console.print(limits_table(limits))
    for line in report.get("limit_errors") or ():
        console.print(f"[red]limits[/red]: {line}", highlight=False)
    checks = [Check(**raw) for raw in report["checks"]]
    if checks:
        console.print(checks_table(checks))
    for result in results.values():
        if not result.available:
            console.print(f"{result.system}: {result.reason}", markup=False, highlight=False)
        for line in result.errors:
            console.print(f"[red]{result.system}[/red]: {line}", highlight=False)
        for line in result.notes:
            console.print(f"{result.system}: {line}", markup=False, highlight=False)
