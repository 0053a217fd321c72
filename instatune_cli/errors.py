"""The one exception type the library raises for bad user input.

The CLI turns it into a one-line message and a non-zero exit; everything else is a bug and keeps its
traceback.
"""


class InstatuneError(Exception):
    """Bad input or state the user can fix; the message names the problem and the fix in one line."""
