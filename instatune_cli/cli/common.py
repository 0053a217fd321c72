"""Helpers shared by the subcommand modules: error handling and console output. Imports only typer/rich."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from instatune_cli.errors import InstatuneError

F = TypeVar("F", bound=Callable[..., Any])


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def fail(msg: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero."""
    console(stderr=True).print(f"[bold red]error:[/] {msg}", soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn InstatuneError into the one-line error contract; keep tracebacks for real bugs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InstatuneError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted; partial work is kept where the stage can resume it", code=130)

    return wrapper  # type: ignore[return-value]


def quiet_libraries() -> None:
    """Keep transformers/torch chatter off the user's terminal; our own output says what happened."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # torchao (pulled in by transformers) makes torch's pytree warn about Enum registration at import time
    # (a filter, not a level: accelerate/torch re-initialise torch's log levels later)
    logging.getLogger("torch.utils._pytree").addFilter(lambda r: "register_constant" not in r.getMessage())
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def not_built(stage: str) -> None:
    fail(f"`instatune {stage}` is not built yet in this release; see CHANGELOG.md for what is available")
