"""`pip install corral` without extras: SQLite works, Redis packages are absent, and asking for
the BullMQ backend says in one line what to install."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

from conftest import IN_CI, ROOT

pytestmark = pytest.mark.slow

RUN_A_JOB = """
import asyncio
from corral import QueueService, QueueSettings

service = QueueService(QueueSettings(sqlite_path="plain.db"))

@service.handler("double")
def double(message):
    return message.data * 2

async def main():
    job_id = await service.enqueue("double", 21)
    await service.start_worker(burst=True)
    job = await service.get_job(job_id)
    print(job.state, job.result)
    await service.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with corral installed from this checkout, no extras."""
    where = tmp_path_factory.mktemp("plain-venv")
    venv.EnvBuilder(with_pip=True).create(where)
    python = where / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        message = f"pip could not install corral into a fresh venv: {done.stderr[-2000:]}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return python


def test_a_plain_install_has_no_redis_packages_and_runs_sqlite_jobs(
    plain_install: Path, tmp_path: Path
) -> None:
    absent = subprocess.run(
        [
            str(plain_install),
            "-c",
            "import importlib.util as u; "
            "print([m for m in ('bullmq', 'redis', 'msgpack', 'hiredis') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert absent.stdout.strip() == "[]", absent.stderr
    ran = subprocess.run(
        [str(plain_install), "-c", RUN_A_JOB],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "completed 42"


def test_the_bullmq_backend_without_the_extra_names_the_install_command(
    plain_install: Path, tmp_path: Path
) -> None:
    corral = plain_install.parent / "corral"
    env = {"PATH": str(plain_install.parent), "QUEUE_BACKEND": "bullmq", "HOME": str(tmp_path)}
    (tmp_path / "tasks.py").write_text("from corral import QueueService\nsvc = QueueService()\n")
    for command in (["stats"], ["enqueue", "x"], ["worker", "tasks", "--burst"]):
        done = subprocess.run(
            [str(corral), *command],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=60,
        )
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "pip install 'corral[redis]'" in lines[0]
        assert "Traceback" not in done.stderr


def test_a_plain_install_ships_the_dashboard_files_and_names_its_extra(
    plain_install: Path, tmp_path: Path
) -> None:
    listed = subprocess.run(
        [
            str(plain_install),
            "-c",
            "from importlib.resources import files; d = files('corral.dashboard'); "
            "print(sorted(p.name for p in (d / 'static').iterdir())); "
            "print(sorted(p.name for p in (d / 'templates').iterdir()))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    static, templates = (eval(line) for line in listed.stdout.splitlines())
    assert static == ["dashboard.css", "dashboard.js", "favicon.svg"]
    assert {"base.html", "overview.html", "queue.html", "job.html"} <= set(templates)
    corral = plain_install.parent / "corral"
    refused = subprocess.run(
        [str(corral), "--sqlite-path", str(tmp_path / "q.db"), "dashboard"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: the dashboard needs its extra (starlette is not installed); install it with: "
        "pip install 'corral[dashboard]'"
    )


def test_worker_metrics_without_the_extra_name_the_install_command(
    plain_install: Path, tmp_path: Path
) -> None:
    corral = plain_install.parent / "corral"
    refused = subprocess.run(
        [str(corral), "--sqlite-path", str(tmp_path / "q.db"), "worker", "--metrics-port", "9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert "pip install 'corral[metrics]'" in refused.stderr
    assert "Traceback" not in refused.stderr
