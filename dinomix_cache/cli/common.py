"""What every verb of the command line shares: the consoles, the one-line errors, logging and shape options."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from transformers.utils import logging as hf_logging

from dinomix_cache.errors import UserError

__all__ = ["err", "given", "out", "parse_shape", "setup_logging", "shape_text", "user_errors"]

F = TypeVar("F", bound=Callable[..., Any])
err = Console(stderr=True)
out = Console()


def user_errors(fn: F) -> F:
    """Turn a UserError into one red line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            one_line = " ".join(str(exc).split())
            err.print(f"[red]error:[/] {escape(one_line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool = False) -> None:
    """Log lines as ``dinomix-cache: ...`` on stderr (DEBUG with ``verbose``); Hugging Face quiet."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="dinomix-cache: %(message)s", force=True)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def parse_shape(text: str, dims: int, what: str) -> tuple[int, ...]:
    """``"80x160x160"`` → (80, 160, 160); a single number repeats (``"160"`` → (160, 160))."""
    try:
        values = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise UserError(f"{what} {text!r}: expected {dims} integers like {'x'.join(['160'] * dims)}") from None
    if len(values) == 1:
        values = values * dims
    if len(values) != dims or min(values) < 1:
        raise UserError(f"{what} {text!r}: expected {dims} positive integers like {'x'.join(['160'] * dims)}")
    return values


def shape_text(shape: tuple[int, ...]) -> str:
    """(80, 160, 160) → ``"80x160x160"``: a settings default as the option text :func:`parse_shape` reads."""
    return "x".join(str(v) for v in shape)


def given(**values: Any) -> dict[str, Any]:
    """The options that were given (not None), so the settings dataclasses keep their own defaults."""
    return {k: v for k, v in values.items() if v is not None}
