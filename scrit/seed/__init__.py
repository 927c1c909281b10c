"""The seed critic: a small model pretrained from scratch on generated arith data (``scrit seed``)."""

from __future__ import annotations

from pathlib import Path

SEED_MODEL_DIR = Path(__file__).resolve().parent.parent / "seed_model"
# Shipped solver checkpoints, by model spec (``solvers[].model``), built by ``scrit seed`` too.
SOLVER_MODEL_DIRS = {"careless": Path(__file__).resolve().parent.parent / "solver_models" / "careless"}


def model_dir() -> Path:
    """Directory of the shipped seed checkpoint; a clear error if it is missing."""
    if not (SEED_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the seed model is missing from {SEED_MODEL_DIR}; rebuild it with `scrit seed` "
            "(see the README) or pass a model directory"
        )
    return SEED_MODEL_DIR


def solver_model_dir(name: str) -> Path:
    """Directory of a shipped solver checkpoint (``careless``); a clear error if it is missing."""
    path = SOLVER_MODEL_DIRS[name]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the {name} solver model is missing from {path}; rebuild it with `scrit seed` "
                                "(see the README) or pass a model directory")
    return path
