"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright; no
browser is downloaded), served by ``corral dashboard`` in a subprocess, on both backends: every
page loads without a console error, the counts are those of ``corral stats``, retry and pause
work by clicking, auto-refresh picks up changes, and untrusted markup stays text."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

from corral import QueueService, QueueSettings

from conftest import PYTHON, ROOT, SettingsFactory, missing, python_env
from test_dashboard import XSS, fill

pytestmark = pytest.mark.browser
T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` in a thread of its own: Playwright's sync API keeps a loop running in
    this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium with a fresh profile, for the whole module."""
    if not os.path.exists(CHROMIUM):
        missing(f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        profile = tempfile.mkdtemp(prefix="corral-chromium-")
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def cli_args(settings: QueueSettings) -> list[str]:
    args = ["--backend", settings.backend, "--queue", settings.name]
    if settings.backend == "sqlite":
        return [*args, "--sqlite-path", settings.sqlite_path]
    return [*args, "--redis-url", settings.redis_url]


@contextmanager
def dashboard(settings: QueueSettings, *extra: str) -> Iterator[str]:
    """``corral dashboard`` on a free port of 127.0.0.1; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [PYTHON, "-m", "corral", *cli_args(settings), "dashboard", "--port", str(port), *extra],
        env=python_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    out, err = process.communicate()
                    raise AssertionError(f"corral dashboard did not start: {out}{err}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def schedule(settings: QueueSettings) -> None:
    async with QueueService(settings) as service:
        await service.schedule("nightly", "report", {"html": XSS}, cron="0 3 * * *")


async def paused(settings: QueueSettings) -> bool:
    async with QueueService(settings) as service:
        return await service.is_paused()


def corral_stats(settings: QueueSettings) -> dict[str, Any]:
    done = subprocess.run(
        [PYTHON, "-m", "corral", *cli_args(settings), "stats", "--json"],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    stats: dict[str, Any] = json.loads(done.stdout)
    return stats


class Watched:
    """A page whose console errors, uncaught exceptions and dialogs are recorded."""

    def __init__(self, context: Any) -> None:
        self.page = context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.accept()

        self.page.on("dialog", on_dialog)

    def open(self, url: str) -> Any:
        response = self.page.goto(url, wait_until="load")
        assert response is not None and response.status == 200, url
        return self.page


@pytest.fixture
def filled(make_settings: SettingsFactory) -> tuple[QueueSettings, dict[str, str]]:
    settings = make_settings()

    async def go() -> dict[str, str]:
        async with QueueService(settings) as service:
            return await fill(service)

    return settings, run(go())


def test_every_page_loads_cleanly_with_the_counts_of_stats(
    browser: Any, filled: tuple[QueueSettings, dict[str, str]]
) -> None:
    settings, ids = filled
    run(schedule(settings))
    stats = corral_stats(settings)
    watched = Watched(browser)
    with dashboard(settings) as url:
        page = watched.open(f"{url}/schedules?queue={settings.name}")
        assert page.locator("#schedules tbody tr").get_attribute("data-schedule-id") == "nightly"
        page = watched.open(url + "/")
        row = page.locator(f'tr[data-queue="{settings.name}"]')
        shown = {
            cell.get_attribute("data-state"): int(cell.inner_text())
            for cell in row.locator("a.count").all()
        }
        assert shown == stats["counts"]
        assert row.locator(".pill").inner_text() == "running"

        with page.expect_navigation():
            page.click(f'a[href="/queues/{settings.name}"]')
        for state, expected in stats["counts"].items():
            with page.expect_navigation():
                page.click(f'a.tab[data-state="{state}"]')
            assert page.locator(f'a.tab[data-state="{state}"] .tab-count').inner_text() == str(
                expected
            )
            assert page.locator("#jobs tbody tr").count() == expected
        for job_id in ids.values():
            watched.open(f"{url}/queues/{settings.name}/jobs/{job_id}")
            assert page.locator("#job-id").inner_text() == job_id
        assert page.evaluate("document.styleSheets.length") == 1  # the local style sheet loaded
    assert watched.errors == []


def test_retry_and_pause_by_clicking(
    browser: Any, filled: tuple[QueueSettings, dict[str, str]]
) -> None:
    settings, ids = filled
    watched = Watched(browser)
    with dashboard(settings) as url:
        page = watched.open(f"{url}/queues/{settings.name}")
        with page.expect_navigation():
            page.click('button[data-action="pause"]')
        assert page.locator("#queue-status").inner_text() == "paused"
        assert "Paused queue" in page.locator(".notice").inner_text()
        assert run(paused(settings)) is True
        with page.expect_navigation():
            page.click('button[data-action="resume"]')
        assert page.locator("#queue-status").inner_text() == "running"
        assert run(paused(settings)) is False

        with page.expect_navigation():
            page.click('a.tab[data-state="failed"]')
        with page.expect_navigation():
            page.click(f'tr[data-job-id="{ids["failed"]}"] button[data-action="retry"]')
        notice = f"Job {ids['failed']} is waiting again, with fresh attempts."
        assert page.locator(".notice-ok").inner_text() == notice
        assert page.locator("#jobs").count() == 0  # the failed tab, now empty
        assert page.locator('a.tab[data-state="failed"] .tab-count').inner_text() == "0"
    counts = corral_stats(settings)["counts"]
    assert (counts["failed"], counts["waiting"]) == (0, 2)
    assert watched.dialogs == [
        f"confirm: Pause queue {settings.name}? Workers will start no new jobs."
    ]
    assert watched.errors == []


@pytest.mark.parametrize("backend_kind", ["sqlite"])  # the page's script; the same on both
def test_pages_refresh_themselves(browser: Any, make_settings: SettingsFactory) -> None:
    settings = make_settings()

    async def enqueue(count: int) -> None:
        async with QueueService(settings) as service:
            await service.enqueue_many([{"name": "tick", "data": n} for n in range(count)])

    run(enqueue(1))
    watched = Watched(browser)
    with dashboard(settings, "--refresh-s", "0.5") as url:
        page = watched.open(url + "/")
        waiting = page.locator(f'tr[data-queue="{settings.name}"] a[data-state="waiting"]')
        assert waiting.inner_text() == "1"
        run(enqueue(4))
        page.wait_for_function(
            "sel => document.querySelector(sel)?.textContent === '5'",
            arg=f'tr[data-queue="{settings.name}"] a[data-state="waiting"]',
            timeout=20_000,
        )
    assert watched.errors == []


@pytest.mark.parametrize("backend_kind", ["sqlite"])  # both: tests/test_dashboard.py
def test_untrusted_markup_stays_inert(
    browser: Any, filled: tuple[QueueSettings, dict[str, str]]
) -> None:
    settings, ids = filled
    watched = Watched(browser)
    with dashboard(settings) as url:
        for job_id in (ids["failed"], ids["completed"]):
            page = watched.open(f"{url}/queues/{settings.name}/jobs/{job_id}")
            assert XSS in page.locator("#job-data").inner_text()
            assert page.locator("main img").count() == 0
        assert XSS in page.locator("#job-result").inner_text()
        failed = watched.open(f"{url}/queues/{settings.name}/jobs/{ids['failed']}")
        assert f"failed {XSS}" in failed.locator("#job-error").inner_text()
        assert f"log {XSS}" in failed.locator("#job-logs").inner_text()
        listing = watched.open(f"{url}/queues/{settings.name}?state=failed")
        assert XSS in listing.locator("#jobs").inner_text()
        assert listing.locator("main img").count() == 0
    assert watched.dialogs == []  # no alert(1) ran
    assert watched.errors == []


@pytest.mark.parametrize("backend_kind", ["sqlite"])  # the forms; actions on both: test_dashboard
def test_enqueue_promote_and_remove_through_the_forms(
    browser: Any, make_settings: SettingsFactory
) -> None:
    settings = make_settings()
    watched = Watched(browser)
    with dashboard(settings) as url:
        page = watched.open(f"{url}/queues/{settings.name}")
        page.click("#enqueue-form summary")
        page.fill('#enqueue-form input[name="name"]', "send_email")
        page.fill('#enqueue-form textarea[name="data"]', json.dumps({"html": XSS}))
        page.fill('#enqueue-form input[name="delay_s"]', "600")
        with page.expect_navigation():
            page.click('#enqueue-form button[type="submit"]')
        assert page.locator("h1 .pill").inner_text() == "delayed"
        assert json.loads(page.locator("#job-data").inner_text()) == {"html": XSS}
        job_id = page.locator("#job-id").inner_text()
        with page.expect_navigation():
            page.click('button[data-action="promote"]')
        assert page.locator("h1 .pill").inner_text() == "waiting"
        with page.expect_navigation():
            page.click('button[data-action="remove"]')
        assert page.locator(".notice-ok").inner_text() == f"Removed job {job_id}."
    counts = corral_stats(settings)["counts"]
    assert set(counts.values()) == {0} and "waiting" in counts
    assert watched.dialogs == [f"confirm: Remove job {job_id}?"]
    assert watched.errors == []
