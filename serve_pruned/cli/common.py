"""What every command shares: output helpers, option types, and the one table from errors to messages.

The root group (:class:`Root`) applies that table once, around every command: a known error becomes
one line on stderr (``error: what failed; what to do``) and exit 1; a usage error one line and exit 2;
SIGINT and SIGTERM (what Kubernetes sends a pod) the same interrupt, so every write's clean-up runs;
anything else is an internal error, with the traceback only under ``SERVE_PRUNED_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import BaseModel

from serve_pruned.errors import ServePrunedError
from serve_pruned.serving.memory import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_MODEL_LEN,
    KV_CACHE_DTYPE_HELP,
    KV_CACHE_DTYPES,
)

DEBUG_ENV = "SERVE_PRUNED_DEBUG"


def info(msg: str) -> None:
    """Progress and status go to stderr; stdout is for data."""
    click.echo(msg, err=True)


def emit(data: Any, fmt: str, text: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, indent=2) if fmt == "json" else text(data))


def _fail(message: str, hint: str = "", *, code: int = 1) -> NoReturn:
    """One line on stderr -- what failed and why; then what to do -- and exit ``code``."""
    one_line = " ".join((message + (f"; {hint}" if hint else "")).split())
    click.echo(f"error: {one_line}", err=True)
    sys.exit(code)


class Interrupted(KeyboardInterrupt):
    """SIGTERM raised as the interrupt SIGINT already is, so ``finally`` and ``except BaseException``
    clean-ups (temp folders, child processes) run for both."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_sigterm(signum: int, _frame: Any) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Interrupted(signum)


def _internal(exc: Exception) -> NoReturn:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        _fail(f"invalid value for {field}: {err['msg']}")
    if os.environ.get(DEBUG_ENV):
        raise exc
    _fail(f"{type(exc).__name__}: {exc}", f"rerun with {DEBUG_ENV}=1 for the traceback, and report it")


class Root(click.Group):
    """The `serve-pruned` group: maps every error to one line, once, for all commands."""

    def invoke(self, ctx: click.Context) -> Any:
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit):
            raise  # usage errors: formatted by main() below
        except ServePrunedError as exc:
            if os.environ.get(DEBUG_ENV):
                traceback.print_exc()
            _fail(exc.message, exc.hint)
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            click.echo(f"interrupted ({signal.Signals(signum).name}); earlier output is untouched and nothing "
                       "half-written is left", err=True)
            sys.exit(128 + signum)
        except Exception as exc:  # noqa: BLE001 - last resort: one line, the traceback on request
            _internal(exc)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,  # type: ignore[override]
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "serve-pruned"
            _fail(exc.format_message().rstrip("."), f"see '{where} --help'", code=exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), code=exc.exit_code)
        except click.Abort:
            click.echo("interrupted; earlier output is untouched", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


COUNT = click.IntRange(min=1)  # instances, samples, tokens, sequences
PORT = click.IntRange(1, 65535)


def max_model_len_option(help: str = "Context length each instance serves (vLLM --max-model-len).") -> Any:
    return click.option("--max-model-len", type=click.IntRange(min=16), default=DEFAULT_MAX_MODEL_LEN,
                        show_default=True, help=help)


def kv_cache_dtype_option() -> Any:
    return click.option("--kv-cache-dtype", type=click.Choice(list(KV_CACHE_DTYPES)), default="auto",
                        show_default=True, help=KV_CACHE_DTYPE_HELP)


def concurrency_option(help: str = "Sequences per instance (vLLM --max-num-seqs).") -> Any:
    return click.option("--concurrency", type=COUNT, default=DEFAULT_CONCURRENCY, show_default=True, help=help)


class OutputPath(click.ParamType):
    """A path the command writes to; an empty string is refused here, since Path('') means the current folder."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        if isinstance(value, Path):
            return value
        if not str(value).strip():
            self.fail("the path is empty, which would mean the current folder; name a new folder or file",
                      param, ctx)
        return Path(value)


OUTPUT = OutputPath()

token_option = click.option(
    "--token", envvar="HF_TOKEN", show_envvar=True,
    help="Hugging Face token (prefer the HF_TOKEN environment variable; never printed).",
)

format_option = click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="Output format on stdout.",
)


def overwrite_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--overwrite", is_flag=True,
        help=f"Replace {what} if it exists and holds only this command's own earlier output "
             "(only once the new output is complete; anything else is never replaced).")


def field_option(cls: type[BaseModel], name: str, *decls: str,
                 **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A flag whose default, help and choices come from the options model ``cls`` (written once, there).

    ``decls`` default to ``--name-with-dashes``; a bool field is a flag (``--x/--no-x`` when given so); a tuple
    field is a repeatable option. Range checks stay in the model, so a recipe and a flag are refused alike.
    """
    import types
    import typing

    info = cls.model_fields[name]
    args = [a for a in typing.get_args(info.annotation) if a is not type(None)]
    optional = typing.get_origin(info.annotation) in (typing.Union, types.UnionType)
    inner = args[0] if optional and len(args) == 1 else info.annotation
    if typing.get_origin(inner) is typing.Literal:
        kw.setdefault("type", click.Choice(list(typing.get_args(inner))))
    elif typing.get_origin(inner) is tuple:
        kw.setdefault("multiple", True)
    elif inner in (int, float):
        kw.setdefault("type", inner)
    elif inner is bool and not any("/" in d for d in decls):
        kw.setdefault("is_flag", True)
    if not kw.get("multiple") and not info.is_required() and info.default is not None:
        kw.setdefault("default", info.default)
        kw.setdefault("show_default", not kw.get("is_flag"))
    if info.description:
        kw.setdefault("help", info.description)
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), **kw)


def flag_origins(ctx: click.Context, values: dict[str, Any]) -> dict[str, str]:
    """field -> the flag that set it, for error messages that name the flag."""
    return {p.name: p.opts[0] for p in ctx.command.params if p.name in values and p.opts}
