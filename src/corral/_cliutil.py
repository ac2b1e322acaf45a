"""What the ``corral`` command and its tool commands (``corral bench``, ``corral chaos``) share:
the global options' state, errors as one line on stderr, and running a tool command that is
imported only when it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import typer

from corral.errors import ConfigError, CorralError
from corral.settings import QueueSettings
from corral.worker import EXIT_CONFIG, EXIT_ERROR

# A tool command registered by cli.py takes every argument as is (``--help`` too) and hands them
# to the tool's own command, so `corral TOOL --help` shows the tool's options.
PASS_ARGUMENTS: dict[str, Any] = {"allow_extra_args": True, "ignore_unknown_options": True}


@dataclass(slots=True)
class CliState:
    """What the global options said, for the commands."""

    overrides: dict[str, Any] = field(default_factory=dict)
    log_level: str | None = None

    def settings(self) -> QueueSettings:
        return QueueSettings(**self.overrides)

    def redis_url(self) -> str:
        """The Redis URL of the global ``--redis-url``, ``QUEUE_REDIS_URL`` or the default."""
        return QueueSettings(
            **{key: self.overrides[key] for key in ("redis_url",) if key in self.overrides}
        ).redis_url


def cli_state(ctx: typer.Context) -> CliState:
    """The state the root command left (an empty one when a command runs on its own)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, CliState) else CliState()


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def corral_errors() -> Iterator[None]:
    """Turn corral's errors into one line on stderr and a non-zero exit, never a traceback."""
    try:
        yield
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
    except CorralError as exc:
        fail(str(exc))
    except TimeoutError:
        fail("the queue backend did not answer in time")


def run_tool_command(ctx: typer.Context, command: Callable[..., Any]) -> None:
    """Run ``command``, a function declared as a Typer command, as the subcommand ``ctx`` is
    running, with the arguments it was given (registered with :data:`PASS_ARGUMENTS`)."""
    tool = typer.Typer(add_completion=False, rich_markup_mode=None)
    tool.command(name=ctx.info_name)(command)
    click_command = typer.main.get_command(tool)
    with click_command.make_context(ctx.info_name, list(ctx.args), parent=ctx.parent) as own:
        click_command.invoke(own)
