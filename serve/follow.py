"""Which model a followed run started from (its version 0), for ``scrit serve --follow``.

Following the run's published versions is ``scrit.checkpoints.VersionFollower``, the one subscriber
every role and replica uses.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["run_seed_model"]

log = logging.getLogger(__name__)


def run_seed_model(run_dir: str | os.PathLike[str]) -> str:
    """The model a run started from (its version 0): ``critic.model`` in the run's ``config.yaml``.

    Falls back to ``summary.json``'s ``seed_model`` and finally to the shipped seed.
    """
    import json

    root = Path(run_dir)
    config_file = root / "config.yaml"
    if config_file.is_file():
        from scrit.config import ConfigError, load_config

        try:
            return load_config(config_file).critic.model
        except ConfigError as error:
            log.warning("cannot read %s (%s); looking for summary.json", config_file, error)
    summary = root / "summary.json"
    if summary.is_file():
        try:
            seed = json.loads(summary.read_text(encoding="utf-8")).get("seed_model")
        except (OSError, ValueError):
            seed = None
        if seed:
            return str(seed)
    return "seed"
