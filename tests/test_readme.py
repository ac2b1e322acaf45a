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


def test_every_python_block_runs(tmp_path: Path) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        result = run(block, tmp_path)
        assert result.returncode == 0, f"{block}\n{result.stderr}"


def test_settings_table_lists_every_setting() -> None:
    from corral import QueueSettings

    for field in QueueSettings.model_fields:
        row = f"| `{field}` | `QUEUE_{field.upper()}` |"
        assert row in README, f"README's settings table lacks {field}"
