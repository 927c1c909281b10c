"""The seed critic: a small model pretrained from scratch on generated arith data (``scrit seed``)."""

from __future__ import annotations

from pathlib import Path

SEED_MODEL_DIR = Path(__file__).resolve().parent.parent / "seed_model"


def model_dir() -> Path:
    """Directory of the shipped seed checkpoint; a clear error if it is missing."""
    if not (SEED_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the seed model is missing from {SEED_MODEL_DIR}; rebuild it with `scrit seed` "
            "(see the README) or pass a model directory"
        )
    return SEED_MODEL_DIR
