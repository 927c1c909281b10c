"""Shared test settings and fixtures: nothing may load from a model hub, data comes from ../shared/data,
and the in-process tests share one local Ray (started once per test session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for every in-process test (``ray.init(num_cpus=2)``, as on these 2-core machines).

    ``address="local"``: never join a Ray that a ``scrit run`` subprocess left running on the host.
    Tests kill the actors they start, so later tests find the CPUs free. Torch in this process runs one
    thread: with Ray's workers on the same two cores, more threads only fight them."""
    ray = pytest.importorskip("ray")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    owned = not ray.is_initialized()
    if owned:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if owned:
        ray.shutdown()
    torch._C.set_num_threads(threads)  # vLLM's CPU worker makes torch.set_num_threads a no-op in its process
