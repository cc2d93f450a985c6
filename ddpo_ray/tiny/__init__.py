"""The offline `tiny` world: procedurally drawn, captioned 64x64 images (`world`), the trainers of
the tiny base model and of the tiny reward models on it, and the weights they wrote (`ASSETS`)."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
