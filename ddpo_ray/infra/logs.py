"""Logging set-up: a quiet console for people, a complete log file for the record. No Ray import.

The library logs through `logging` (loggers under `ddpo_ray`); only entry points configure
handlers. By default the console shows the run's own lines (set-up, one line per epoch, the
summary; `ddpo_ray` at INFO and above) and errors from anywhere; `--verbose` brings back every
library's INFO lines (Ray, Serve, Ray Train, transformers). Each run also writes `run.log` in its
directory: everything at INFO and above, the run's own DEBUG lines included, with timestamps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

PACKAGE_LOGGERS = ("ddpo_ray", "reward_services")
CONSOLE_FORMAT = "%(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _OwnLinesOrErrors(logging.Filter):
    """The project's INFO+ lines and anyone's errors (the non-verbose console)."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in PACKAGE_LOGGERS
        return (own and record.levelno >= logging.INFO) or record.levelno >= logging.ERROR


class _OwnDebugOthersInfo(logging.Filter):
    """The project's DEBUG+ lines and everyone else's INFO+ (the run's log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in PACKAGE_LOGGERS
        return own or record.levelno >= logging.INFO


def quiet_third_party(verbose: bool) -> None:
    """Known third-party chatter off the console unless `verbose`: transformers' torchvision
    notices (before transformers is imported; inherited by Ray's worker processes)."""
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def quiet_serve_driver_lines(verbose: bool) -> None:
    """Ray Serve prints its driver-side INFO lines ("Started Serve", "Application ... is ready")
    on a stream handler of its own, set up when `ray.serve` is imported: unless `verbose`, that
    handler shows warnings and errors only. Call after importing `ray.serve`."""
    if verbose:
        return
    for handler in logging.getLogger("ray.serve").handlers:
        handler.setLevel(logging.WARNING)


def setup_console_logging(verbose: bool = False) -> None:
    """The console of an entry point (call once, first thing in `main`)."""
    quiet_third_party(verbose)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for name in PACKAGE_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    handler.setLevel(logging.INFO)
    if not verbose:
        handler.addFilter(_OwnLinesOrErrors())
    handler.set_name("ddpo_ray.console")
    root.handlers = [h for h in root.handlers if h.get_name() != "ddpo_ray.console"] + [handler]
    logging.captureWarnings(True)  # library warnings go to the log file, not the console


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[Path]:
    """Append everything logged in this process to `path` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(logging.DEBUG)
    handler.addFilter(_OwnDebugOthersInfo())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
