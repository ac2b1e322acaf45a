"""The dashboard over HTTP (Starlette's test client), on both backends: pages, actions, CSRF,
read-only mode, auth, mounting under a prefix, and untrusted job data rendered as text.
The same pages in a real browser: tests/test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import html
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.testclient import TestClient

from corral import JobState, QueueMessage, QueueService, QueueSettings
from corral.dashboard import create_app

from conftest import PYTHON, SettingsFactory, finished, python_env, run_worker_until

XSS = "<img src=x onerror=alert(1)>"


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert match is not None, "the page has no action form"
    return match.group(1)


def counts_on(html: str, queue: str) -> dict[str, int]:
    """The counts the overview shows for ``queue`` (its row's data-count attributes)."""
    row = re.search(rf'<tr data-queue="{re.escape(queue)}">(.*?)</tr>', html, re.S)
    assert row is not None, f"no row for {queue}"
    return {
        state: int(count)
        for state, count in re.findall(r'data-state="([\w-]+)" data-count="(\d+)"', row.group(1))
    }


async def fill(service: QueueService) -> dict[str, str]:
    """One job in each state but active, including a failed one with two attempts' tracebacks
    and untrusted markup in its data, result, error and logs."""

    @service.handler("boom")
    async def boom(message: QueueMessage) -> None:
        await message.log(f"log {XSS}")
        raise RuntimeError(f"failed {XSS}")

    @service.handler("ok")
    async def ok(message: QueueMessage) -> str:
        await message.progress(40)
        return f"result {XSS}"

    ids = {
        "failed": await service.enqueue("boom", {"html": XSS}, attempts=2),
        "completed": await service.enqueue("ok", {"html": XSS}),
    }
    await run_worker_until(service, finished(service, 2), concurrency=1)
    ids["waiting"] = await service.enqueue("send_email", {"to": "ada"})
    ids["delayed"] = await service.enqueue("send_email", {"to": "bob"}, delay_s=3600)
    return ids


@pytest.fixture
def filled(make_settings: SettingsFactory) -> Iterator[tuple[QueueSettings, dict[str, str]]]:
    settings = make_settings(backoff_delay_s=0.0)

    async def go() -> dict[str, str]:
        async with QueueService(settings) as service:
            return await fill(service)

    yield settings, asyncio.run(go())


def test_pages_show_every_queue_with_the_counts_of_stats(
    filled: tuple[QueueSettings, dict[str, str]],
) -> None:
    settings, ids = filled
    with TestClient(create_app(settings)) as client:
        overview = client.get("/")
        assert overview.status_code == 200
        assert counts_on(overview.text, settings.name) == {
            "active": 0,
            "waiting": 1,
            "waiting-children": 0,
            "delayed": 1,
            "failed": 1,
            "completed": 1,
        }
        for state in ("waiting", "delayed", "failed", "completed", "active"):
            page = client.get(f"/queues/{settings.name}", params={"state": state})
            assert page.status_code == 200
            listed = re.findall(r'<tr data-job-id="([^"]+)">', page.text)
            assert listed == ([ids[state]] if state in ids else [])
        job = client.get(f"/queues/{settings.name}/jobs/{ids['failed']}")
        assert job.status_code == 200
        assert job.text.count('<details class="trace"') == 2  # one per failed attempt
        assert "Attempt 2 (latest)" in job.text
        missing = client.get(f"/queues/{settings.name}/jobs/nope")
        assert missing.status_code == 404


def test_untrusted_job_data_is_text(filled: tuple[QueueSettings, dict[str, str]]) -> None:
    settings, ids = filled
    escaped = "&lt;img src=x onerror=alert(1)&gt;"
    with TestClient(create_app(settings)) as client:
        for job_id in (ids["failed"], ids["completed"]):
            page = client.get(f"/queues/{settings.name}/jobs/{job_id}")
            assert "<img src=x" not in page.text
            assert escaped in page.text
            policy = page.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        failed = client.get(f"/queues/{settings.name}/jobs/{ids['failed']}").text
        assert f"failed {escaped}" in failed and f"log {escaped}" in failed
        completed = client.get(f"/queues/{settings.name}/jobs/{ids['completed']}").text
        assert f"result {escaped}" in completed
        listing = client.get(f"/queues/{settings.name}", params={"state": "failed"}).text
        assert "<img src=x" not in listing and escaped in listing


def test_actions_through_forms(filled: tuple[QueueSettings, dict[str, str]]) -> None:
    settings, ids = filled
    queue = settings.name

    def act(client: TestClient, action: str, **form: Any) -> str:
        token = csrf_of(client.get(f"/queues/{queue}").text)
        response = client.post(
            f"/queues/{queue}/actions/{action}", data={"csrf": token, **form}, follow_redirects=True
        )
        assert response.status_code == 200
        notice = re.search(r'class="notice notice-(\w+)" role="status">([^<]*)<', response.text)
        assert notice is not None
        return f"{notice.group(1)}: {notice.group(2)}"

    async def counts() -> dict[JobState, int]:
        async with QueueService(settings) as service:
            return await service.counts()

    with TestClient(create_app(settings)) as client:
        assert act(client, "pause").startswith("ok: Paused")
        assert 'id="queue-status">paused' in client.get(f"/queues/{queue}").text
        assert act(client, "resume").startswith("ok: Resumed")

        assert act(client, "retry", job_id=ids["failed"]).startswith("ok: Job")
        assert act(client, "retry", job_id=ids["waiting"]).startswith("error: job")
        assert act(client, "promote", job_id=ids["delayed"]).startswith("ok: Job")
        now = asyncio.run(counts())
        assert (now[JobState.WAITING], now[JobState.DELAYED], now[JobState.FAILED]) == (3, 0, 0)

        assert act(client, "remove", job_id=ids["waiting"]) == f"ok: Removed job {ids['waiting']}."
        assert act(client, "clean", state="completed", older_than_min="0", keep="0") == (
            "ok: Deleted 1 completed job(s)."
        )
        assert act(client, "clean", state="waiting").startswith("error: choose")
        assert act(client, "enqueue", name="made", data="{not json").startswith("error: the data")
        assert act(client, "enqueue", name="made", data='{"n": 1}', priority="2").startswith(
            "ok: Enqueued job"
        )
        now = asyncio.run(counts())
        assert (now[JobState.WAITING], now[JobState.COMPLETED]) == (3, 0)


def test_retry_all_failed(make_settings: SettingsFactory) -> None:
    settings = make_settings()

    async def go() -> None:
        async with QueueService(settings) as service:

            @service.handler("boom")
            async def boom(message: QueueMessage) -> None:
                raise RuntimeError("no")

            await service.enqueue_many([{"name": "boom", "data": n} for n in range(3)])
            await run_worker_until(service, finished(service, 3))

    asyncio.run(go())
    with TestClient(create_app(settings)) as client:
        token = csrf_of(client.get(f"/queues/{settings.name}", params={"state": "failed"}).text)
        done = client.post(f"/queues/{settings.name}/actions/retry-all", data={"csrf": token})
        assert "Moved 3 failed job(s) back to waiting." in done.text
        assert counts_on(client.get("/").text, settings.name)["waiting"] == 3


def test_actions_need_the_csrf_token_and_same_origin(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    asyncio.run(_enqueue(settings, "x"))
    with TestClient(create_app(settings)) as client:
        token = csrf_of(client.get(f"/queues/{settings.name}").text)
        url = f"/queues/{settings.name}/actions/pause"
        assert client.post(url).status_code == 400  # not a form at all
        assert client.post(url, data={"next": "/"}).status_code == 403
        assert client.post(url, data={"csrf": "0" * 64}).status_code == 403
        cross = client.post(url, data={"csrf": token}, headers={"Sec-Fetch-Site": "cross-site"})
        assert cross.status_code == 403
        sibling = client.post(url, data={"csrf": token}, headers={"Sec-Fetch-Site": "same-site"})
        assert sibling.status_code == 403
        assert client.get(url).status_code == 405
        # Another client (another browser) has another cookie: this token is not valid there.
        with TestClient(client.app) as stranger:
            stranger.get("/")
            assert stranger.post(url, data={"csrf": token}).status_code == 403
        assert asyncio.run(_paused(settings)) is False
        assert client.post(url, data={"csrf": token}).status_code == 200
        assert asyncio.run(_paused(settings)) is True


def test_read_only_shows_no_action_and_refuses_them(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    job_id = asyncio.run(_enqueue(settings, "x"))
    with TestClient(create_app(settings, read_only=True)) as client:
        page = client.get(f"/queues/{settings.name}")
        assert page.status_code == 200 and "read-only" in page.text
        assert 'method="post"' not in page.text
        assert 'method="post"' not in client.get(f"/queues/{settings.name}/jobs/{job_id}").text
        refused = client.post(f"/queues/{settings.name}/actions/pause", data={"csrf": "x"})
        assert refused.status_code == 403
    assert asyncio.run(_paused(settings)) is False


def test_basic_auth_from_settings(make_settings: SettingsFactory) -> None:
    settings = make_settings(dashboard_user="ada", dashboard_password="s3cret-pw")
    with TestClient(create_app(settings)) as client:
        refused = client.get("/")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic ")
        assert client.get("/static/dashboard.css").status_code == 401
        assert client.get("/", auth=("ada", "wrong")).status_code == 401
        assert client.get("/", auth=("bob", "s3cret-pw")).status_code == 401
        page = client.get("/", auth=("ada", "s3cret-pw"))
        assert page.status_code == 200
        assert "s3cret-pw" not in page.text
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in str(settings.model_dump())


def test_auth_callable_of_the_app_that_mounts_it(make_settings: SettingsFactory) -> None:
    settings = make_settings(dashboard_user="ada", dashboard_password="pw")

    async def staff_only(request: Request) -> bool:
        return request.headers.get("x-staff") == "yes"

    with TestClient(create_app(settings, auth=staff_only)) as client:
        assert client.get("/").status_code == 403
        assert client.get("/", headers={"x-staff": "yes"}).status_code == 200


def test_mounted_under_a_prefix_in_starlette_and_fastapi(make_settings: SettingsFactory) -> None:
    from fastapi import FastAPI

    settings = make_settings()
    job_id = asyncio.run(_enqueue(settings, "x"))
    starlette_app = Starlette(routes=[Mount("/admin/queues", app=create_app(settings))])
    fastapi_app = FastAPI()
    fastapi_app.mount("/ops/jobs", create_app(settings))
    for app, prefix in ((starlette_app, "/admin/queues"), (fastapi_app, "/ops/jobs")):
        with TestClient(app) as client:
            overview = client.get(prefix + "/")
            assert overview.status_code == 200
            links = re.findall(r'href="([^"]+)"', overview.text)
            assert f"{prefix}/queues/{settings.name}" in links
            assert all(link.startswith(prefix + "/") for link in links), links
            page = client.get(f"{prefix}/queues/{settings.name}")
            assert f'href="{prefix}/queues/{settings.name}/jobs/{job_id}"' in page.text
            assert client.get(f"{prefix}/static/dashboard.js").status_code == 200
            token = csrf_of(page.text)
            assert f'action="{prefix}/queues/{settings.name}/actions/pause"' in page.text
            done = client.post(
                f"{prefix}/queues/{settings.name}/actions/pause",
                data={"csrf": token, "next": f"{prefix}/queues/{settings.name}"},
                follow_redirects=False,
            )
            assert done.status_code == 303
            assert done.headers["location"] == f"{prefix}/queues/{settings.name}"
            resumed = client.post(
                f"{prefix}/queues/{settings.name}/actions/resume",
                data={"csrf": token, "next": "https://evil.test/"},
                follow_redirects=False,
            )
            assert resumed.headers["location"] == f"{prefix}/queues/{settings.name}"


def test_paging_and_search(make_settings: SettingsFactory) -> None:
    settings = make_settings()

    async def go() -> list[str]:
        async with QueueService(settings) as service:
            return await service.enqueue_many(
                [{"name": "send_email" if n % 3 else "resize", "data": n} for n in range(120)]
            )

    ids = asyncio.run(go())
    with TestClient(create_app(settings)) as client:
        base = f"/queues/{settings.name}"
        third = client.get(base, params={"state": "waiting", "page": 3})
        assert re.findall(r'<tr data-job-id="([^"]+)">', third.text) == ids[100:]
        assert "101\u2013120 of 120" in third.text
        found = client.get(base, params={"state": "waiting", "q": "RESIZE"})
        assert re.findall(r'<tr data-job-id="([^"]+)">', found.text) == ids[::3]
        exact = client.get(base, params={"state": "waiting", "q": ids[7]}, follow_redirects=False)
        assert exact.status_code == 303 and exact.headers["location"] == f"{base}/jobs/{ids[7]}"


@pytest.mark.parametrize("backend_kind", ["bullmq"])
def test_the_redis_password_never_appears(redis_url: str, make_settings: SettingsFactory) -> None:
    # Redis has no password set: redis-py goes on without one, and the page shows the URL.
    settings = make_settings(redis_url="redis://:hunter2-pw@127.0.0.1:6379/0", backend="bullmq")
    with TestClient(create_app(settings)) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert "hunter2-pw" not in page.text
        assert "redis://:***@127.0.0.1:6379/0" in page.text
    # A user Redis does not know: refused, an error page that names the server, no password.
    refused = make_settings(redis_url="redis://nobody:hunter2-pw@127.0.0.1:6379/0")
    with TestClient(create_app(refused)) as client:
        page = client.get("/")
        assert page.status_code == 503
        assert "refused the credentials" in page.text
        assert "hunter2-pw" not in page.text
        assert "redis://nobody:***@127.0.0.1:6379/0" in page.text


def test_without_the_extra_the_error_says_what_to_install(tmp_path: Any) -> None:
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "for name in ('starlette', 'jinja2', 'uvicorn'):\n"
        "    sys.modules[name] = None\n"
    )
    env = python_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    result = subprocess.run(
        [PYTHON, "-m", "corral", "--sqlite-path", str(tmp_path / "q.db"), "dashboard"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "pip install 'corral[dashboard]'" in result.stderr
    assert "Traceback" not in result.stderr


async def _enqueue(settings: QueueSettings, name: str) -> str:
    async with QueueService(settings) as service:
        return await service.enqueue(name, {"n": 1})


async def _paused(settings: QueueSettings) -> bool:
    async with QueueService(settings) as service:
        return await service.is_paused()


def test_the_readme_dispatcher_for_django(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    block = next(
        code
        for code in re.findall(r"^```python\n(.*?)^```", readme, re.S | re.M)
        if "def with_dashboard" in code
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    settings = make_settings()
    asyncio.run(_enqueue(settings, "x"))
    namespace["dashboard"] = create_app(settings)

    async def django(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"django"})

    client = TestClient(namespace["with_dashboard"](django))  # no lifespan: the fake has none
    assert client.get("/polls/").text == "django"
    assert client.get("/admin/queuesX").text == "django"
    page = client.get("/admin/queues/")
    assert page.status_code == 200
    assert f'href="/admin/queues/queues/{settings.name}"' in page.text
    assert client.get(f"/admin/queues/queues/{settings.name}").status_code == 200
    asyncio.run(namespace["dashboard"].aclose())


def test_odd_job_ids_link_to_their_pages(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    odd = "invoice/2026?x=1#top&<b>"  # ('%' works too, but the test client decodes it twice)

    async def go() -> None:
        async with QueueService(settings) as service:
            await service.enqueue("x", 1, job_id=odd)

    asyncio.run(go())
    with TestClient(create_app(settings)) as client:
        listing = client.get(f"/queues/{settings.name}")
        href = re.search(r'<td class="mono"><a href="([^"]+)">', listing.text)
        assert href is not None
        page = client.get(href.group(1).replace("&amp;", "&"))
        assert page.status_code == 200
        assert re.search(r'id="job-id">([^<]+)<', page.text).group(1) == (  # type: ignore[union-attr]
            "invoice/2026?x=1#top&amp;&lt;b&gt;"
        )
        token = csrf_of(page.text)
        removed = client.post(
            f"/queues/{settings.name}/actions/remove", data={"csrf": token, "job_id": odd}
        )
        assert f"Removed job {odd}." in html.unescape(removed.text)


def test_panels_of_later_capabilities_render_when_the_storage_has_them(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers column and the throughput chart draw what the storage reports (the real
    figures are checked in tests/test_workers.py and tests/test_metrics.py)."""
    from datetime import UTC, datetime

    from corral.dashboard.storage import Storage, Throughput

    async def workers(self: Storage, queue: str) -> int:
        return 3

    async def throughput(self: Storage, queue: str) -> Throughput:
        return Throughput(completed=[0, 4, 9, 2], failed=[0, 1, 0, 0], end=datetime.now(UTC))

    monkeypatch.setattr(Storage, "workers", workers)
    monkeypatch.setattr(Storage, "throughput", throughput)
    settings = make_settings()
    asyncio.run(_enqueue(settings, "x"))
    with TestClient(create_app(settings)) as client:
        overview = client.get("/").text
        assert '<th class="num">workers</th>' in overview
        assert re.search(r'<td class="num">3</td>', overview)
        queue = client.get(f"/queues/{settings.name}").text
        assert "<h2>Throughput</h2>" in queue and "completed 15" in queue and "failed 1" in queue
        assert queue.count("<polyline") == 2
        assert "3 workers" in queue


def test_a_flow_links_parents_and_children(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    other = make_settings(name=settings.name + "-steps")

    async def go() -> Any:
        async with QueueService(settings) as service:
            return await service.enqueue_flow(
                {
                    "name": "assemble",
                    "data": {"html": XSS},
                    "children": [
                        {"name": "fetch", "data": 1},
                        {"name": "render", "data": 2, "queue": other.name},
                    ],
                }
            )

    flow = asyncio.run(go())
    parent, (first, second) = flow, flow.children
    with TestClient(create_app(settings)) as client:
        waiting = client.get(f"/queues/{settings.name}", params={"state": "waiting-children"})
        assert re.findall(r'<tr data-job-id="([^"]+)">', waiting.text) == [parent.id]
        assert counts_on(client.get("/").text, settings.name)["waiting-children"] == 1
        page = client.get(f"/queues/{settings.name}/jobs/{parent.id}").text
        children = re.findall(r'<li data-child-id="([^"]+)"><a href="([^"]+)">', page)
        assert sorted(children) == sorted(  # Redis keeps a parent's children in a set
            [
                (first.id, f"/queues/{settings.name}/jobs/{first.id}"),
                (second.id, f"/queues/{other.name}/jobs/{second.id}"),
            ]
        )
        assert page.count('<span class="pill child-pending">pending</span>') == 2
        child = client.get(f"/queues/{other.name}/jobs/{second.id}").text
        link = re.search(r'<a id="job-parent" href="([^"]+)">([^<]+)</a>', child)
        assert link is not None
        assert link.groups() == (f"/queues/{settings.name}/jobs/{parent.id}", parent.id)
        assert "pill state-waiting-children" in child


def test_the_command_imports_the_dashboard_only_when_it_runs() -> None:
    probe = (
        "import sys, corral.cli; "
        "print([m for m in sys.modules if m.startswith(('starlette', 'jinja2', 'uvicorn', "
        "'corral.dashboard'))])"
    )
    imported = subprocess.run(
        [PYTHON, "-c", probe], env=python_env(), capture_output=True, text=True, timeout=60
    )
    assert imported.stdout.strip() == "[]", imported.stdout + imported.stderr
    helped = subprocess.run(
        [PYTHON, "-m", "corral", "dashboard", "--help"],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.stdout.startswith("Usage: corral dashboard [OPTIONS]")
    for option in ("--host", "--port", "--read-only", "--refresh-s"):
        assert option in helped.stdout, option
    assert "127.0.0.1" in helped.stdout


def test_schedules_page_and_the_schedule_a_job_came_from(make_settings: SettingsFactory) -> None:
    settings = make_settings()

    async def go() -> None:
        async with QueueService(settings) as service:
            await service.schedule("nightly-report", "report", {"kind": XSS}, cron="0 3 * * *")
            await service.schedule("heartbeat", "ping", every_s=90, limit=10)
            await service.enqueue("other", 1)

    asyncio.run(go())
    with TestClient(create_app(settings)) as client:
        everywhere = client.get("/schedules").text  # on Redis other queues' schedules too
        assert f'<tr data-schedule-id="heartbeat" data-queue="{settings.name}">' in everywhere
        page = client.get("/schedules", params={"queue": settings.name})
        assert page.status_code == 200
        rows = re.findall(r'<tr data-schedule-id="([^"]+)" data-queue="([^"]+)">', page.text)
        assert rows == [("heartbeat", settings.name), ("nightly-report", settings.name)]
        assert "0 3 * * *" in page.text and "every 90 s" in page.text and "of 10" in page.text
        assert "<img src=x" not in page.text
        links = re.findall(r'href="(/queues/[^"]+/jobs/[^"]+)"', page.text)
        assert len(links) == 2
        job = client.get(links[0])
        assert job.status_code == 200
        assert re.search(r'id="job-schedule" href="[^"]+">heartbeat<', job.text)
        queue = client.get(f"/queues/{settings.name}").text
        assert 'id="queue-schedules"' in queue and "nightly-report" in queue
        filtered = client.get("/schedules", params={"queue": "no-such-queue"}).text
        assert "No schedules." in filtered
        assert 'href="/schedules"' in client.get("/").text  # in the navigation
