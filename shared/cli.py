"""Run a typer app so that bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from enum import Enum
from typing import Any, Literal, TypeVar, cast, get_args

import click
import typer

from shared.config import DeviceName, SnapshotMode, TeacherAttention, TeacherCompileMode
from shared.console import rank_tag
from shared.errors import EXIT_USAGE, SaltUsageError, one_line

_Error = TypeVar("_Error", bound=BaseException)


def _click_flavours(click_class: type[_Error]) -> tuple[type[_Error], ...]:
    """The class from click and from the copy of click that newer typer releases vendor (typed as click's:
    a copy of the same code, so the same attributes)."""
    name = click_class.__name__
    classes = [click_class, getattr(typer, name, None)]
    try:
        from typer._click import exceptions as vendored  # newer typer releases ship their own click

        classes.append(getattr(vendored, name, None))
    except ImportError:
        pass
    return cast("tuple[type[_Error], ...]", tuple({c for c in classes if isinstance(c, type)}))


_USAGE_ERRORS = _click_flavours(click.exceptions.UsageError)
_CLICK_ERRORS = _click_flavours(click.exceptions.ClickException)
_EXITS = _click_flavours(click.exceptions.Exit)
_INTERRUPTS: tuple[type[BaseException], ...] = (*_click_flavours(click.exceptions.Abort), KeyboardInterrupt)


def choices(name: str, values: Any) -> Any:
    """A str Enum of a config ``Literal``'s values, for a flag: typer lists the choices in --help
    and refuses others. Members are named like the values, ``-`` as ``_`` (``max_autotune``)."""
    return Enum(name, [(value.replace("-", "_"), value) for value in get_args(values)], type=str)


# The flags' choices, each a config Literal's values. Made here, not in each command's module: mypy takes an
# imported name of type Any (what choices returns) as a type, and a module's own such name as an invalid one.
Device = choices("Device", DeviceName)  # what --device accepts
TeacherCompile = choices("TeacherCompile", TeacherCompileMode)
TeacherAttentionChoice = choices("TeacherAttentionChoice", TeacherAttention)
SnapshotChoice = choices("SnapshotMode", SnapshotMode)
EvalProtocol = choices("Protocol", Literal["fast", "vjepa"])  # salt-train eval's two protocols


DEVICE_HELP = "auto (CUDA when available), cpu or cuda"


def run_app(app: typer.Typer, prog_name: str, argv: Sequence[str] | None = None) -> int:
    """Invoke ``app`` and turn every kind of usage error into ``prog: error: ...`` and 2."""
    try:
        result = app(args=list(argv) if argv is not None else None, prog_name=prog_name, standalone_mode=False)
    except SaltUsageError as err:
        if not getattr(err, "quiet", False):  # under torchrun, rank 0 says what every rank found
            _error_line(prog_name, str(err))
        return EXIT_USAGE
    except _USAGE_ERRORS as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare command: show its help as is
            print(err.format_message())
        else:
            _error_line(prog_name, err.format_message())
        return EXIT_USAGE
    except _CLICK_ERRORS as err:
        _error_line(prog_name, err.format_message())
        return EXIT_USAGE
    except _EXITS as err:
        return err.exit_code
    except _INTERRUPTS:
        print(f"{prog_name}: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def _error_line(prog_name: str, message: str) -> None:
    print(f"{prog_name}{rank_tag()}: error: {one_line(message, None)}", file=sys.stderr)


def make_app(help_text: str) -> typer.Typer:
    """A typer app with plain (non-rich) errors so the one-line rule holds."""
    return typer.Typer(
        help=help_text,
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
