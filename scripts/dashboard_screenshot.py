"""Screenshots of the dashboard for the docs: ``docs/dashboard.png`` (a queue),
``dashboard-queues.png``, ``dashboard-job.png`` and ``dashboard-schedules.png``.

    .venv/bin/python scripts/dashboard_screenshot.py [--out-dir docs]

Fills a temporary SQLite file with a few queues (jobs run by a real worker, some failing), serves
the dashboard on a free port of 127.0.0.1 and photographs it with Debian's headless Chromium
(``apt-get install chromium``), as the browser tests drive it.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from corral import QueueMessage, QueueService, QueueSettings

ROOT = Path(__file__).resolve().parent.parent
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


async def fill(path: str) -> str:
    """A few queues in every state; returns the id of a failed job."""
    emails = QueueService(QueueSettings(sqlite_path=path, name="emails", backoff_delay_s=0))

    @emails.handler("send_email")
    async def send_email(message: QueueMessage) -> dict[str, str]:
        await message.log(f"rendering template {message.data['template']!r}")
        await message.progress(100)
        if message.data["to"].endswith("@bounce.test"):
            await message.log("connecting to smtp.example.com:587")
            raise ConnectionRefusedError("smtp.example.com:587 refused the connection")
        return {"message_id": f"<{message.id}@mail.example.com>"}

    templates = ["welcome", "receipt", "password-reset", "digest"]
    await emails.enqueue_many(
        [
            {
                "name": "send_email",
                "data": {
                    "to": f"user{n}@{'bounce.test' if n % 9 == 4 else 'example.com'}",
                    "template": templates[n % len(templates)],
                },
                "attempts": 3,
            }
            for n in range(48)
        ]
    )
    await emails.start_worker(concurrency=4, burst=True)
    await emails.enqueue_many(
        [
            {"name": "send_email", "data": {"to": f"late{n}@example.com", "template": "digest"}}
            for n in range(17)
        ]
    )
    await emails.enqueue_many(
        [
            {
                "name": "send_email",
                "data": {"to": f"soon{n}@example.com", "template": "digest"},
                "delay_s": 600 + 60 * n,
            }
            for n in range(6)
        ]
    )
    await emails.schedule(
        "daily-digest",
        "send_email",
        {"to": "team@example.com", "template": "digest"},
        cron="0 7 * * *",
    )
    await emails.schedule(
        "warm-up-smtp", "send_email", {"to": "probe@example.com", "template": "ping"}, every_s=900
    )
    failed = (await emails.list_jobs("failed", limit=1))[0].id
    await emails.close()

    images = QueueService(QueueSettings(sqlite_path=path, name="images"))
    await images.enqueue_many(
        [{"name": "resize", "data": {"key": f"uploads/{n}.jpg", "width": 320}} for n in range(124)]
    )
    await images.pause()
    await images.close()

    reports = QueueService(QueueSettings(sqlite_path=path, name="reports"))

    @reports.handler("build_report")
    async def build_report(message: QueueMessage) -> str:
        return f"reports/{message.data['month']}.pdf"

    await reports.enqueue_many(
        [{"name": "build_report", "data": {"month": f"2026-{m:02d}"}} for m in range(1, 12)]
    )
    await reports.start_worker(burst=True)
    await reports.close()
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=str(ROOT / "docs"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        path = str(Path(scratch) / "demo.db")
        failed = asyncio.run(fill(path))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "corral",
                "--sqlite-path",
                "demo.db",
                "dashboard",
                "--port",
                str(port),
                "--refresh-s",
                "0",
            ],
            cwd=scratch,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the dashboard did not start") from None
                    time.sleep(0.1)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
                )
                page = browser.new_page(viewport={"width": 1280, "height": 560})
                page.goto(f"{url}/queues/emails?state=failed", wait_until="load")
                page.screenshot(path=str(out / "dashboard.png"), full_page=True)
                page.goto(f"{url}/queues/emails/jobs/{failed}", wait_until="load")
                page.screenshot(path=str(out / "dashboard-job.png"))
                page.goto(f"{url}/", wait_until="load")
                page.screenshot(path=str(out / "dashboard-queues.png"), full_page=True)
                page.goto(f"{url}/schedules", wait_until="load")
                page.screenshot(path=str(out / "dashboard-schedules.png"), full_page=True)
                browser.close()
        finally:
            server.terminate()
            server.wait(10)
    print(f"wrote {out / 'dashboard.png'} and the other screenshots beside it")


if __name__ == "__main__":
    main()
