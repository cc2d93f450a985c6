"""What a training entry point checks before any model, server or Ray starts.

`python -m ddpo_ray.run` and `python -m ddpo_ray.local` share it: the config is valid, the
trackers it names are installed, and the run's directory is new (or resumed on purpose). Each
refusal is one of `PREFLIGHT_ERRORS`, whose message names the bad field or path; the entry
point prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ddpo_ray.config import ConfigError, DDPOConfig, config_from_args
from ddpo_ray.records.run_dir import RunDirectoryExistsError, new_run_root
from ddpo_ray.records.trackers import TrackerNotInstalledError, check_trackers_installed

PREFLIGHT_ERRORS = (ConfigError, TrackerNotInstalledError, RunDirectoryExistsError)


def preflight(args: argparse.Namespace) -> tuple[DDPOConfig, Path]:
    """The validated config and the run's root directory (its name fixed once for the whole run)."""
    cfg = config_from_args(args)
    check_trackers_installed(cfg.trackers)
    return cfg, new_run_root(cfg)
