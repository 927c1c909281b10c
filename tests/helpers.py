"""Helpers shared by the test modules (fixtures live in conftest.py): free ports and ``scrit run`` in a
subprocess, with its own Ray and nothing from a model hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scrit.actors.local_cluster import free_port  # noqa: F401  (one free_port for tests and benchmarks)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-test.yaml"


def scrit_env(**extra: str) -> dict[str, str]:
    """The environment of a ``scrit`` subprocess: offline, and its own local Ray unless ``RAY_ADDRESS``
    is given. ``local``, not empty: with no address Ray joins any Ray already running on the host (found by
    process name), which here is the test session's own."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_ADDRESS": "local", **extra}


def scrit_run_command(run_dir: Path, *extra: str, config: Path | None = TINY) -> list[str]:
    return [sys.executable, "-m", "scrit.cli", "run", *(["--config", str(config)] if config else []),
            "--run-dir", str(run_dir), *extra]


def run_scrit(run_dir: Path, *extra: str, config: Path | None = TINY, timeout: float = 900,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``scrit run`` to the end (default: the tiny test config); output captured."""
    return subprocess.run(scrit_run_command(run_dir, *extra, config=config), cwd=REPO, env=env or scrit_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_scrit(run_dir: Path, *extra: str, config: Path | None = TINY,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """``scrit run`` in the background, in its own process group (``os.killpg`` reaches only this run)."""
    return subprocess.Popen(scrit_run_command(run_dir, *extra, config=config), cwd=REPO, env=env or scrit_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
