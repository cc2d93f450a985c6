"""Crash-safe JSON-lines files: metrics.jsonl (one row per epoch) and eval.jsonl (one per evaluation).

Rows are appended with an fsync, so a killed run keeps every finished row; a half-written last
line (the only damage a kill can do) is skipped on read and dropped before the next append;
rewrites (a resumed run dropping rows it will redo) are atomic.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

from ddpo_ray.records.files import atomic_write, to_plain


class JsonLines:
    """One JSON-lines file of mappings; `what` names its rows in errors ("metrics", "eval row")."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what

    def append(self, row: Mapping[str, Any]) -> None:
        """Append one row as a JSON line, fsynced; numpy values and tensors become plain Python,
        nan and inf become null (JSON has neither)."""
        path, what = self.path, self.what
        if not isinstance(row, Mapping):
            raise TypeError(f"{what}: expected a mapping, got {type(row).__name__}")
        plain = to_plain(row, what, nonfinite_to_none=True)
        line = json.dumps(plain, allow_nan=False) + "\n"  # ASCII only: a cut line cannot split a character
        self._drop_partial_last_line()
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        """All rows in file order; [] before the first.

        A corrupt last line is what a run killed mid-write leaves, so it is skipped (with a
        warning); a corrupt line anywhere else means the file was damaged, and is an error.
        """
        path = self.path
        if not path.exists():
            return []
        lines = path.read_bytes().split(b"\n")
        numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
        rows = []
        for number, line in numbered:
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                if number == numbered[-1][0]:
                    warnings.warn(f"{path}: skipping truncated last line {number} "
                                  "(a run killed mid-write)", stacklevel=3)
                    break
                raise ValueError(
                    f"{path}: line {number} is not valid JSON ({err}); "
                    "expected one JSON object per line"
                ) from err
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}: line {number} is a JSON {type(row).__name__}; "
                    "expected one JSON object per line"
                )
            rows.append(row)
        return rows

    def _drop_partial_last_line(self) -> None:
        """Before appending, remove a half-written last line left by a killed run.

        Appending after it would glue it to the new record and make a corrupt line in the
        middle of the file. A last line that is complete JSON and only lacks its newline is kept.
        """
        path = self.path
        if not path.exists() or path.stat().st_size == 0:
            return
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            start = data.rfind(b"\n") + 1
            try:
                complete = isinstance(json.loads(data[start:].decode("utf-8")), dict)
            except (UnicodeDecodeError, json.JSONDecodeError):
                complete = False
            if complete:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(start)
            f.flush()
            os.fsync(f.fileno())

    def keep(self, predicate: Callable[[dict], bool]) -> None:
        """Rewrite the file (atomically) with only the rows `predicate` accepts."""
        if not self.path.exists():
            return
        kept = [row for row in self.read() if predicate(row)]
        text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in kept)
        atomic_write(self.path, text.encode("utf-8"))
