"""How every `deepfusion` command reports what went wrong: one line per problem on stderr.

`Commands` is the group class of every Typer of the CLI: each command is parsed and run
inside `reported()`, so a new command cannot escape it. There, the library's input errors
(click's usage errors, pydantic's validation errors, OSError, the library's own exception
classes and the ValueErrors its code raises; a stages file's problems one line each) exit
with status 2; a full disk, wherever it surfaced (Python, Orbax's TensorStore, TensorBoard's
TensorFlow), prints one line naming the file and exits with status 1; a node stopped by
SIGTERM/SIGINT exits with 128 + the signal. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer
from typer.core import TyperGroup

USAGE_ERROR = 2
FAILURE = 1
# Click's usage errors (typer >= 0.26 vendors its own click): the bases of typer.BadParameter.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_PACKAGES = ("deepfusion_core", "pipeline", "flows", "deepfusion_cli", "deepfusion_bench")
_ROOT = Path(__file__).resolve().parents[1]


def _raised_by_us(e: BaseException) -> bool:
    """Whether the innermost frame that raised `e` is the library's own code."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    where = Path(tb.tb_frame.f_code.co_filename).resolve()
    return where.is_relative_to(_ROOT) and where.relative_to(_ROOT).parts[0] in _PACKAGES


def input_problems(e: BaseException) -> list[str] | None:
    """One line per problem if `e` is bad input: click's usage errors, pydantic's validation
    errors, OSError, the library's own exception classes and the ValueErrors its code raises
    (one from deep inside numpy or JAX is a bug); None otherwise."""
    from pydantic import ValidationError

    from deepfusion_core.errors import validation_lines

    if isinstance(e, _UsageError):
        command = e.ctx.command_path.partition(" ")[2] if e.ctx else ""
        return [f"{command + ': ' if command else ''}{' '.join(e.format_message().split())}"]
    if isinstance(e, ValidationError):
        return validation_lines(e)
    if not (isinstance(e, OSError) or type(e).__module__.partition(".")[0] in _PACKAGES
            or isinstance(e, ValueError) and _raised_by_us(e)):
        return None
    if isinstance(getattr(e, "problems", None), list):
        return e.problems  # a stages file's problems, already one line each
    text = str(e).strip()
    return [text.splitlines()[0] if text else type(e).__name__]


@contextlib.contextmanager
def reported():
    """Turn what a command raises into its lines on stderr and its exit status."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # noqa: BLE001 - sorted below; anything else is re-raised
        preemption = sys.modules.get("deepfusion_core.preemption")
        if preemption is not None and isinstance(e, preemption.Preempted):
            # The node saved a checkpoint; a rerun resumes it. Its stderr may be a pipe to a
            # flow process that died (the reason for the stop): the exit status still counts.
            with contextlib.suppress(OSError):
                typer.echo(str(e), err=True)
            raise typer.Exit(128 + e.signum) from None
        # Every command that writes has loaded the library (whose import takes seconds: not
        # for a usage error).
        if "deepfusion_core" in sys.modules:
            from deepfusion_core import disk

            if (full := disk.no_space(e)) is not None:
                typer.echo(f"error: {disk.describe(full)}", err=True)
                raise typer.Exit(FAILURE) from None
        if type(e).__name__ == "NoArgsIsHelpError" or (problems := input_problems(e)) is None:
            raise  # click's help for a bare group, or a bug with its traceback
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(USAGE_ERROR) from None


class Commands(TyperGroup):
    """The group class of every Typer here: each command is parsed and run inside
    `reported`, so no command can be added without its errors being reported alike."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        with reported():
            return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context):
        with reported():
            return super().invoke(ctx)
