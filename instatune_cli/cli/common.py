"""Helpers shared by the subcommand modules: error handling and console output. Imports only typer/rich."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, TypeVar

import typer

from instatune_cli.errors import InstatuneError

F = TypeVar("F", bound=Callable[..., Any])

#: the default every --threads / --latency-threads shows (`measure.latency.default_threads` decides it)
THREADS_DEFAULT = "$OMP_NUM_THREADS if set, else every CPU this process may use"
#: the default --seq-len shows for export and quantize
SEQ_LEN_DEFAULT = "128, or the model's maximum if shorter"
MEASURE = "Measuring"
#: what the shared latency options say, unless a command words them for itself
LATENCY_HELP = {"batch": "Batch size for the latency measurement.",
                "seq_len": "Sequence length for the latency measurement.",
                "threads": "ONNX Runtime intra-op threads for every latency figure.",
                "runs": "Timed runs per latency measurement (after warm-up)."}


def defaults(options: type) -> SimpleNamespace:
    """The field defaults of an options dataclass by name: what its command's options default to, so that the
    dataclass is their one source (docs/architecture.md, "Options and stages"). A field without a default is
    absent, so naming a removed or misspelt field fails when the command is defined, not when it runs."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return SimpleNamespace(**out)


def latency_option(name: str, *, prefix: str = "", help: str | None = None, show_default: str | None = None) -> Any:
    """The one definition of a latency option (`name`: batch, seq_len, threads or runs of
    `measure.latency.LatencyOptions`, which holds its default): `--batch` ..., or `--latency-batch` ... with
    `prefix="latency-"`, in the Measuring panel; `help` / `show_default` word it for a command."""
    from instatune_cli.measure.latency import LatencyOptions

    shown = show_default or {"seq_len": SEQ_LEN_DEFAULT, "threads": THREADS_DEFAULT}.get(name, True)
    return typer.Option(getattr(defaults(LatencyOptions), name), f"--{prefix}{name.replace('_', '-')}",
                        rich_help_panel=MEASURE, show_default=shown, help=help or LATENCY_HELP[name])


def plain_flag_labels() -> None:
    """typer labels every flag `<bool>` in help, though a flag takes no value; show no type for flags."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_instatune", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    display_type_rich._instatune = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def score_text(metric: str, value: float | None) -> str:
    """A score as users read it everywhere: shares (accuracy, f1) as percentages, correlations as numbers."""
    if value is None:
        return "-"
    if str(metric).lower() in ("mcc", "pearson", "spearman"):
        return f"{float(value):.4f}"
    return f"{100 * float(value):.2f}%"


def accuracy_change(fp32: dict[str, Any], int8: dict[str, Any], change_points: float) -> str:
    """`accuracy on 300 eval examples: FP32 81.00% -> INT8 80.33% (-0.67 points)`: one sign convention, the
    change INT8 made (negative: lost)."""
    metric, change = fp32["metric"], round(change_points, 2) + 0.0  # + 0.0: no "-0.00"
    return (f"{metric} on {fp32['n']} {fp32.get('split', 'eval')} examples: FP32 {score_text(metric, fp32['score'])}"
            f" -> INT8 {score_text(metric, int8['score'])} ({change:+.2f} points)")


def threads_of(latency: dict[str, Any]) -> str:
    """`1 thread` / `2 threads`: every latency figure says the thread count it was measured with."""
    n = int(latency.get("threads") or 0)
    return f"{n} thread" + ("" if n == 1 else "s")


def print_table(out: Any, table: Any) -> None:
    """On a terminal rich fits a table to its width (cells fold onto more lines; give a column
    `overflow="fold"` so that nothing is cut). Into a file, pipe or CI log there is no width to fit, and rich's
    80-column default cut names to `L5-h6.8x2.6…`: print the table at its natural width there, every cell whole
    on one line."""
    if out.is_terminal:
        out.print(table)
        return
    from rich.console import Console
    from rich.measure import Measurement

    natural = Measurement.get(out, out.options.update(max_width=100_000), table).maximum
    # a console of that width on the same stream (print(width=...) never goes past the console's own width)
    Console(file=out.file, width=max(natural, out.width), highlight=False).print(table)


def fail(msg: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero."""
    from rich.markup import escape

    console(stderr=True).print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn InstatuneError, and a write the file system refused anywhere (disk full, quota, permission,
    read-only), into the one-line error contract; keep tracebacks for real bugs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        restore = on_sigterm()
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            mute_sigterm()  # stopping: a launcher's SIGTERM must not cut the one line being printed
            report(e)
        finally:
            restore()

    return wrapper  # type: ignore[return-value]


def report(e: BaseException) -> None:
    """The one-line error for `e` (and its exit code); anything that is not the user's to fix is re-raised."""
    from instatune_cli.artifacts import as_write_error
    from instatune_cli.errors import Interrupted, Terminated, interrupt_of

    if isinstance(e, InstatuneError):
        fail(str(e))
    e = interrupt_of(e) or e  # a Ctrl-C a library re-raised as another error is still a Ctrl-C
    if isinstance(e, Interrupted):  # inside a stage: it says what was kept (130 Ctrl-C, 143 SIGTERM)
        fail(e.message, code=e.exit_code)
    if isinstance(e, KeyboardInterrupt):  # before a stage opened its output, or while it was already stopping
        why, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        fail(f"{why}; any unfinished tune or search is kept in its --output's .partial directory, which "
             "--resume continues", code=code)
    if isinstance(e, Exception):  # only refused writes become one line; the rest keeps its traceback
        err = as_write_error(e, "", "")
        if err is not e:
            fail(str(err))
    raise e


def mute_sigterm() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def on_sigterm() -> Any:
    """SIGTERM (a scheduler, `kill`, a closing terminal) stops a stage as Ctrl-C does, so it exits with one line
    saying what was kept; returns what puts the previous handler back (nothing to do off the main thread)."""
    import signal
    import threading

    from instatune_cli.errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the stage is stopping, a second one changes nothing
        raise Terminated()

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# Warnings third-party libraries print on every run that tell a user of instatune nothing (found by running every
# stage with `python -W always`): (category, module regex, message regex). Every other warning is still shown.
NOISY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"torch\.utils\._pytree", r".*LeafSpec"),
    (UserWarning, r"torch\.library", r"(?s).*Overriding a previously registered kernel"),
    (UserWarning, r"torch\._functorch", r"Anomaly Detection has been enabled"),
    (UserWarning, r"torch\.onnx", r".*axis name.*will not be used"),
)


def quiet_libraries() -> None:
    """Keep transformers/torch chatter off the user's terminal; our own output says what happened."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging
    import warnings

    for category, module, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # torchao (pulled in by transformers) makes torch's pytree warn about Enum registration at import time
    # (a filter, not a level: accelerate/torch re-initialise torch's log levels later)
    logging.getLogger("torch.utils._pytree").addFilter(lambda r: "register_constant" not in r.getMessage())
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


