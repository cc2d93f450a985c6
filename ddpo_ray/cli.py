"""`ddpo-ray`: one console command for the `python -m` entry points (which keep working).

    ddpo-ray run [--config FILE] [key.path=value ...]        = python -m ddpo_ray.run
    ddpo-ray local [--config FILE] [key.path=value ...]      = python -m ddpo_ray.local
    ddpo-ray evaluate --run outputs/my-run                   = python -m ddpo_ray.evaluate
    ddpo-ray export outputs/my-run --out my-lora             = python -m ddpo_ray.export

`ddpo-ray COMMAND --help` shows a command's options. On a cluster keep
`ray job submit -- python -m ddpo_ray.run ...`: it needs no installed script on the head's PATH.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

PROG = "ddpo-ray"
# command -> (module whose `main(argv, prog)` runs it, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("ddpo_ray.run", "train on a Ray cluster (sampler actors, Serve rewards, Ray Train learner)"),
    "local": ("ddpo_ray.local", "train in this process, no Ray (the reference loop)"),
    "evaluate": ("ddpo_ray.evaluate", "held-out table and side-by-side grids for a run's checkpoints"),
    "export": ("ddpo_ray.export", "write a Hub-ready LoRA folder (weights, model card, config)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", f"'{PROG} COMMAND --help' shows the options of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ddpo-ray COMMAND ARGS...`; returns the command's exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: {PROG}: unknown command {command!r}; expected one of {list(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])  # only the command's own imports
    return int(module.main(rest, prog=f"{PROG} {command}"))


if __name__ == "__main__":
    sys.exit(main())
