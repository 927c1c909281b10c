"""Serving the evolving critic with Ray Serve (DESIGN.md §9); imported as ``scrit.serve``.

* ``scrit.serve.app``: the Serve application (FastAPI ingress), ``start_critic_endpoint`` and
  ``stop_critic_endpoint``;
* ``scrit.serve.service``: the replica's active model and zero-downtime hot swap;
* ``scrit.serve.follow``: following a run's ``versions/registry.jsonl``;
* ``scrit.serve.schema``: request/response shapes and validation.

``import scrit.serve`` stays cheap: Ray is imported only with ``scrit.serve.app``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["start_critic_endpoint", "stop_critic_endpoint"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from scrit.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
