"""Building a config: defaults <- preset <- YAML file (--config) <- command-line overrides.

Validated in full before anything else runs, so a typo fails in a second instead of after the
cluster has started; every problem is reported with its dotted field name.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import ValidationError

from ddpo_ray.config.presets import PRESETS, merged
from ddpo_ray.config.schema import ConfigError, DDPOConfig


def parse_override(text: str) -> tuple[list[str], Any]:
    """`sample.num_steps=10` -> (["sample", "num_steps"], 10); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    path = key.strip().split(".")
    if any(not part for part in path):
        raise ConfigError(f"override {text!r} has an empty key in its path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    return path, value


def _set_path(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _read_yaml(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {str(path)!r}: no such file")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(path)!r} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each starting with the dotted field name."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "config"
        message = err["msg"].removeprefix("Value error, ")
        shown_input = err.get("input")
        if err["type"] != "value_error" and not isinstance(shown_input, dict):
            message += f" (got {shown_input!r})"
        lines.append(f"  {loc}: {message}")
    return "invalid config:\n" + "\n".join(lines)


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> DDPOConfig:
    """defaults <- preset <- YAML file <- overrides, validated; raises ConfigError on any problem.

    The preset is the first of: an override `preset=...`, the file's `preset:` key, the
    `preset` argument, "tiny".
    """
    file_data = _read_yaml(config_file) if config_file is not None else {}
    parsed = [parse_override(text) for text in overrides]
    chosen = preset or "tiny"
    if "preset" in file_data:
        chosen = file_data["preset"]
    for path, value in parsed:
        if path == ["preset"]:
            chosen = value
    if chosen not in PRESETS:
        raise ConfigError(f"preset={chosen!r} is not a preset; expected one of {sorted(PRESETS)}")
    data = merged(PRESETS[chosen], file_data)
    for path, value in parsed:
        _set_path(data, path, value)
    data["preset"] = chosen
    try:
        return DDPOConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file with config values")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="base preset (default: tiny)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.path=value",
        help="config overrides, e.g. sample.num_steps=10 train.learning_rate=1e-4",
    )


def config_from_args(args: argparse.Namespace) -> DDPOConfig:
    return build_config(preset=args.preset, config_file=args.config, overrides=args.overrides)
