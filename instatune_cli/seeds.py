"""Named, order-free seeds: every random choice in instatune (epoch order, sampled sub-networks, dropout,
the validation split, the calibration sample) draws from `random.Random(seed_int(purpose, seed, ...))`, so
it depends only on what it is for and the user's `--seed`, never on how many draws came before it."""

from __future__ import annotations

import hashlib
from typing import Any


def seed_int(*parts: Any) -> int:
    """A 63-bit integer from the repr of `parts` (sha256): stable across runs, processes and Python versions."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)
