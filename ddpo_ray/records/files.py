"""Crash-safe file writes and JSON-safe values, for every record a run writes.

`atomic_write` is how every rewritten file (config, images, truncated JSONL, checkpoint
payloads) is replaced: a killed run leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file next to `path`, fsync, rename over it (atomic on POSIX), fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: without this a power cut may bring back the old name's contents."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform or filesystem that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)



def to_plain(value: Any, where: str, nonfinite_to_none: bool) -> Any:
    """`value` as plain Python (dict, list, str, int, float, bool, None) for JSON or safe YAML.

    numpy scalars and arrays, and tensors (anything with .tolist() or .item()) are converted;
    `where` names the value in errors, e.g. "metrics['loss']".
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):  # also np.str_, which safe YAML cannot represent
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):  # also np.float64, a float subclass
        value = float(value)
        return None if nonfinite_to_none and not math.isfinite(value) else value
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, f"{where}[{k!r}]", nonfinite_to_none) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]", nonfinite_to_none) for i, v in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return to_plain(value.tolist(), where, nonfinite_to_none)
    if hasattr(value, "item"):
        return to_plain(value.item(), where, nonfinite_to_none)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"{where}: cannot store a {type(value).__name__}; expected a number, str, bool, None, "
        "list, mapping, numpy value or tensor"
    )
