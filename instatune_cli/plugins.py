"""Loading third-party plug-ins named by entry points (model families, search algorithms)."""

from __future__ import annotations

import warnings


def load_entry_points(group: str, what: str) -> None:
    """Import every module named by an entry point of `group` (importing it registers the plug-in). A broken one is
    a warning naming it, so it cannot break the built-in `what`s."""
    from importlib.metadata import entry_points  # read only when a registry is first used

    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - any failure of third-party code is that plug-in's, not ours
            warnings.warn(f"instatune {what} plug-in {ep.name!r} ({ep.value}) failed to load: {e}", stacklevel=3)
