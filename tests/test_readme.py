"""The README's Python examples run as written."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT, python_env

README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)


def run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-c", code],
        env=python_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_quick_start_prints_the_result(tmp_path: Path) -> None:
    quick_start = python_blocks()[0]
    assert "asyncio.run(main())" in quick_start

    result = run(quick_start, tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "completed hello, Ada"
    assert (tmp_path / "corral.db").exists()  # the documented default


MYAPP_TASKS = """
from corral import QueueMessage, QueueService

service = QueueService()


@service.handler("send_email")
async def send_email(message: QueueMessage) -> dict[str, str]:
    return {"sent": message.data["to"]}
"""


def test_every_python_block_runs(tmp_path: Path) -> None:
    """Each block runs as a script; a block of tests runs under pytest (with pytest-asyncio's
    auto mode, as the README says), against a ``myapp.tasks`` module like the one it names."""
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "tasks.py").write_text(MYAPP_TASKS)
    blocks = python_blocks()
    assert len(blocks) >= 3
    tests_run = 0
    for index, block in enumerate(blocks):
        if "def test_" in block:
            path = tmp_path / f"test_readme_block_{index}.py"
            path.write_text(block)
            result = subprocess.run(
                [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
                 "--rootdir", str(tmp_path), str(path)],
                env=python_env(PYTHONPATH=f"{python_env()['PYTHONPATH']}:{tmp_path}"),
                cwd=tmp_path, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert result.returncode == 0, f"{block}\n{result.stdout}\n{result.stderr}"
            assert " passed" in result.stdout
            tests_run += 1
        else:
            result = run(block, tmp_path)
            assert result.returncode == 0, f"{block}\n{result.stderr}"
    assert tests_run >= 1


def test_settings_table_lists_every_setting() -> None:
    from corral import QueueSettings

    for field in QueueSettings.model_fields:
        row = f"| `{field}` | `QUEUE_{field.upper()}` |"
        assert row in README, f"README's settings table lacks {field}"
