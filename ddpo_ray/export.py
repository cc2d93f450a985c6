"""`python -m ddpo_ray.export`: a Hub-ready folder of a run's LoRA (weights, model card, config).

    python -m ddpo_ray.export outputs/my-run --out my-lora --repo-id me/my-lora   # best, else the newest
    python -m ddpo_ray.export outputs/my-run/checkpoints/epoch_0004 --out my-lora
    huggingface-cli upload me/my-lora my-lora                                     # pushing stays yours

The folder holds pytorch_lora_weights.safetensors (diffusers' format: `load_lora_weights`
loads it), README.md (the model card: base model, tags, training config, held-out results,
usage) and training_config.yaml (the run's resolved config). Checkpoints of older ddpo-ray
versions (a best/ with PEFT-keyed policy_weights.safetensors) are converted on the way.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

from ddpo_ray.config import ConfigError, build_config
from ddpo_ray.records.checkpoint import BEST_INFO, MODEL_CARD, load_policy_weights, read_best_info
from ddpo_ray.records.files import atomic_write
from ddpo_ray.records.run_dir import CHECKPOINTS_DIR, CONFIG_FILE, RunDirectory

EXPORTED_CONFIG = "training_config.yaml"


class ExportError(ValueError):
    """The source cannot be exported; the message says what was expected."""


def resolve_source(source: Path) -> tuple[RunDirectory, Path, str, int]:
    """(run, checkpoint directory, label, policy version) of a run directory or a checkpoint in one."""
    source = Path(source)
    if (source / CONFIG_FILE).is_file():  # a run: its best, else its newest checkpoint
        run_dir = RunDirectory(source)
        best = read_best_info(run_dir)
        if best is not None:
            return run_dir, run_dir.best_dir, "best", int(best["policy_version"])
        latest = run_dir.latest_checkpoint()
        if latest is None:
            raise ExportError(f"{source}: the run has no checkpoints/best and no complete checkpoint yet")
        source = latest
    run_root = source.parent.parent
    if source.parent.name != CHECKPOINTS_DIR or not (run_root / CONFIG_FILE).is_file():
        raise ExportError(f"{source}: expected a run directory or a checkpoint inside one (<run>/checkpoints/NAME)")
    run_dir = RunDirectory(run_root)
    if source.name == "best":
        info = read_best_info(run_dir)
        if info is None:
            raise ExportError(f"{source}: no {BEST_INFO} (the best checkpoint was not written completely)")
        return run_dir, source, "best", int(info["policy_version"])
    epoch = next((e for e, path in run_dir.list_checkpoints() if path == source), None)
    if epoch is None:
        raise ExportError(f"{source}: not a complete checkpoint (expected checkpoints/epoch_NNNN with COMPLETE)")
    return run_dir, source, source.name, epoch + 1


def export_lora(source: Path, out: Path, repo_id: str | None = None) -> Path:
    """Write the Hub-ready folder `out` for `source` (see the module docstring); returns `out`.

    repo_id: the Hub repository it will be pushed to, for the card's usage snippet.
    """
    from ddpo_ray.models.lora import save_lora_weights
    from ddpo_ray.records.model_card import run_model_card

    run_dir, checkpoint, label, version = resolve_source(source)
    try:
        cfg = build_config(config_file=run_dir.config_path)
    except ConfigError as exc:
        raise ExportError(f"{run_dir.config_path}: {exc}") from None
    use_lora, weights = load_policy_weights(checkpoint)
    if not use_lora:
        raise ExportError(f"{checkpoint}: a full fine-tune (model.use_lora: false); export writes LoRA adapters only")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out}: exists and is not empty; give a new or empty directory")
    save_lora_weights(weights, out)
    card = run_model_card(cfg, run_dir, label=label, policy_version=version, weights_location=repo_id or out)
    atomic_write(out / MODEL_CARD, card.encode("utf-8"))
    shutil.copyfile(run_dir.config_path, out / EXPORTED_CONFIG)
    return out


def main(argv: Sequence[str] | None = None, prog: str = "python -m ddpo_ray.export") -> int:
    """The command line of `export`; `prog` is how it was called (`ddpo-ray export` from ddpo_ray.cli)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory (exports its best, else its newest "
                        "checkpoint) or a checkpoint in one (checkpoints/best, checkpoints/epoch_NNNN)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (new or empty)")
    parser.add_argument("--repo-id", help="the Hub repository (user/name) it will be uploaded to, for the "
                        "card's usage snippet (default: the folder's path)")
    args = parser.parse_args(argv)
    try:
        out = export_lora(args.source, args.out, args.repo_id)
    except (ExportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: pytorch_lora_weights.safetensors, {MODEL_CARD}, {EXPORTED_CONFIG}")
    print(f"upload it with: huggingface-cli upload {args.repo_id or '<user>/<repo>'} {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
