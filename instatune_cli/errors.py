"""The one exception type the library raises for bad user input.

The CLI turns it into a one-line message and a non-zero exit; everything else is a bug and keeps its
traceback.
"""


class InstatuneError(Exception):
    """Bad input or state the user can fix; the message names the problem and the fix in one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM inside a stage, still a KeyboardInterrupt for library callers, carrying the one true
    line the CLI prints: what was kept (a resumable partial) or that nothing was written."""

    def __init__(self, msg: str, exit_code: int = 130) -> None:
        super().__init__(msg)
        self.message, self.exit_code = msg, exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the CLI's handler so a stage stops as on Ctrl-C (partial kept or removed)."""


def interrupt_of(e: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C/SIGTERM behind `e`: itself, or one a library turned into another error (onnxruntime's import
    raises `ImportError: initialization failed` from a KeyboardInterrupt), following explicit causes and
    unsuppressed contexts."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return None
