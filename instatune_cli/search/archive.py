"""Append-only archive of real evaluations: the search's source of truth and its resume point.

One JSON object per line in `archive.jsonl`, flushed and fsynced per row, so a kill loses at most the
evaluation in flight. A torn last line (killed mid-write) is ignored on read and cut off before the next
append. `archive.csv` is a mirror for people, rewritten when a search finishes.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from instatune_cli.errors import InstatuneError
from instatune_cli.space import SearchSpace, SubNet

ARCHIVE_JSONL = "archive.jsonl"
ARCHIVE_CSV = "archive.csv"
RESERVED = ("index", "id", "name", "layers", "heads", "ffn", "quant", "genes", "iteration", "origin", "measured",
            "seconds")


def _clean(v: Any) -> Any:
    """JSON-safe scalar: numpy numbers become Python ones; other odd objects become strings."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return str(v)


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows and the byte length of the valid prefix (a torn last line is not part of it)."""
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    pos = 0
    lines = data.split(b"\n")
    for k, line in enumerate(lines):
        last = k == len(lines) - 1
        if not line.strip():
            pos += len(line) + (0 if last else 1)
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if last or all(not rest.strip() for rest in lines[k + 1:]):
                break  # torn tail from a kill: ignore, the next append truncates it
            raise InstatuneError(f"{path} line {k + 1} is not valid JSON; the archive is damaged") from None
        rows.append(row)
        pos += len(line) + (0 if last else 1)  # a complete last row without newline is kept
    return rows, pos


class Archive:
    """Rows of real evaluations in `directory`, unique by SubNet id."""

    def __init__(self, directory: Path, space: SearchSpace, objective_names: Iterable[str]) -> None:
        self.directory = Path(directory)
        self.space = space
        self.objective_names = list(objective_names)
        self.rows: list[dict[str, Any]] = []
        self._by_id: dict[str, dict[str, Any]] = {}
        self._valid_bytes = 0

    @property
    def path(self) -> Path:
        return self.directory / ARCHIVE_JSONL

    @classmethod
    def create(cls, directory: Path, space: SearchSpace, objective_names: Iterable[str]) -> Archive:
        """A new, empty archive; refuses to overwrite one (resume it instead)."""
        arc = cls(directory, space, objective_names)
        if arc.path.exists() and arc.path.stat().st_size > 0:
            raise InstatuneError(
                f"{arc.path} already exists; resume that search or choose an empty directory"
            )
        arc.directory.mkdir(parents=True, exist_ok=True)
        arc.path.write_bytes(b"")
        return arc

    @classmethod
    def load(cls, directory: Path, space: SearchSpace, objective_names: Iterable[str]) -> Archive:
        """Read an existing archive for resuming; every row must fit `space` and carry every objective."""
        arc = cls(directory, space, objective_names)
        if not arc.path.is_file():
            raise InstatuneError(f"nothing to resume: {arc.path} does not exist")
        rows, arc._valid_bytes = _read_rows(arc.path)
        for k, row in enumerate(rows):
            try:
                sub = SubNet.from_dict(row)
            except InstatuneError as e:
                raise InstatuneError(f"{arc.path} row {k + 1}: {e}") from None
            if not space.contains(sub):
                raise InstatuneError(
                    f"{arc.path} row {k + 1} ({sub.name}) is outside the search space; "
                    "resume with the same space"
                )
            missing = [n for n in arc.objective_names if n not in row]
            if missing:
                raise InstatuneError(
                    f"{arc.path} row {k + 1} has no {', '.join(missing)}; "
                    "resume with the objectives it was run with"
                )
            if sub.id in arc._by_id:
                raise InstatuneError(
                    f"{arc.path} holds {sub.name} twice (row {k + 1}); the archive is damaged"
                )
            row["id"] = sub.id
            arc.rows.append(row)
            arc._by_id[sub.id] = row
        return arc

    def __len__(self) -> int:
        return len(self.rows)

    def has(self, sub_id: str) -> bool:
        return sub_id in self._by_id

    def get(self, sub_id: str) -> dict[str, Any] | None:
        return self._by_id.get(sub_id)

    def add(self, sub: SubNet, values: Mapping[str, Any], *, iteration: int, origin: str,
            seconds: float) -> dict[str, Any]:
        """Append one evaluation and make it durable before returning; an id can be added only once."""
        if sub.id in self._by_id:
            raise InstatuneError(f"{sub.name} is already in the archive; it is never evaluated twice")
        clash = sorted(set(values) & set(RESERVED))
        if clash:
            raise InstatuneError(f"evaluation returned reserved key(s) {clash}; rename them")
        row: dict[str, Any] = {
            "index": len(self.rows), "id": sub.id, "name": sub.name, "layers": sub.layers,
            "heads": list(sub.heads), "ffn": list(sub.ffn), "genes": self.space.encode(sub),
        }
        if sub.quant:
            row["quant"] = list(sub.quant)
        for k, v in values.items():
            row[str(k)] = _clean(v)
        row.update({"iteration": int(iteration), "origin": origin, "measured": True,
                    "seconds": round(seconds, 6)})
        line = (json.dumps(row, separators=(",", ":"), allow_nan=True) + "\n").encode()
        with open(self.path, "r+b" if self.path.exists() else "wb") as fh:
            fh.truncate(self._valid_bytes)  # drop a torn tail left by a kill
            if self._valid_bytes:
                fh.seek(self._valid_bytes - 1)
                if fh.read(1) != b"\n":
                    line = b"\n" + line
            fh.seek(self._valid_bytes)
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self._valid_bytes += len(line)
        self.rows.append(row)
        self._by_id[sub.id] = row
        return row

    def write_csv(self, path: Path | None = None, extra: Mapping[str, list[Any]] | None = None) -> Path:
        """Mirror to CSV (lists as JSON); `extra` adds computed columns (e.g. feasible), one value per row."""
        return write_rows_csv(path or self.directory / ARCHIVE_CSV, self.rows, extra)


def write_rows_csv(path: Path, rows: list[dict[str, Any]], extra: Mapping[str, list[Any]] | None = None,
                   first: Iterable[str] = ()) -> Path:
    """Atomically write rows as CSV; columns in first-seen order, `first` ones leading."""
    cols: list[str] = list(first)
    for r in rows:
        cols += [k for k in r if k not in cols]
    extra = dict(extra or {})
    cols += [k for k in extra if k not in cols]
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for i, r in enumerate(rows):
            merged = {**r, **{k: v[i] for k, v in extra.items()}}
            w.writerow([_cell(merged.get(c, "")) for c in cols])
    os.replace(tmp, path)
    return Path(path)


def _cell(v: Any) -> Any:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    if isinstance(v, float) and math.isfinite(v):
        return repr(v)
    return v
