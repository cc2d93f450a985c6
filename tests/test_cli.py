"""The `ddpo-ray` console command: pyproject's entry point resolves, each subcommand reaches
its `python -m` entry point (argument parsing and validation for real; no run is started).

The console script itself is not installed here (the shared venv's editable install points at
another checkout), so the entry point is resolved the way the installer's wrapper does it:
import the module named in [project.scripts], take the attribute, call it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ddpo_ray.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_script_resolves_to_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module_name, _, attribute = scripts["ddpo-ray"].partition(":")
    entry = getattr(importlib.import_module(module_name), attribute)
    assert callable(entry) and entry is main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    printed = capsys.readouterr().out
    for command in ("run", "local", "evaluate", "export"):
        assert f"  {command}" in printed
    assert main([]) == 2 and "usage: ddpo-ray COMMAND" in capsys.readouterr().err


def test_an_unknown_command_is_named(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'; expected one of ['run', 'local', 'evaluate', 'export']" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_has_its_own_help_under_the_new_name(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: ddpo-ray {command}" in capsys.readouterr().out


def test_commands_reach_their_entry_points(tmp_path, capsys):
    assert main(["local", f"output_dir={tmp_path}", "train.timestep_fraction=2"]) == 2  # the config check
    assert "train.timestep_fraction" in capsys.readouterr().err
    assert main(["run", f"output_dir={tmp_path}", "trackers=[mlflow]"]) == 2  # before Ray is touched
    assert "trackers: unknown ['mlflow']" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "no config.yaml there" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "expected a run directory or a checkpoint" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["run", "local"])
def test_training_commands_refuse_an_earlier_runs_directory_before_starting(command, tmp_path, capsys):
    """Both training entry points share one preflight: an old run's records are never merged into."""
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"epoch": 0}\n')
    assert main([command, f"output_dir={tmp_path}", "run_name=old-run"]) == 2  # no Ray, no model loaded
    assert "already holds a run (metrics.jsonl)" in capsys.readouterr().err
    assert sorted(p.name for p in old.iterdir()) == ["metrics.jsonl"]


def test_python_m_forms_still_work():
    for module in ("ddpo_ray.cli", "ddpo_ray.run", "ddpo_ray.export"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout
