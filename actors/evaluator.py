"""Held-out evaluation of every published critic version, off the producer pipeline.

The evaluator actor holds its own copy of the critic and scores a version in direct mode (no
reference) on held-out arith problems, which no training example ever uses (DESIGN.md §6); its
scores are the run's learning curve (``metrics.jsonl`` ``eval`` events, ``report.md``).
"""

from __future__ import annotations

from typing import Any

from scrit import telemetry

__all__ = ["Evaluator"]


class Evaluator:
    """Scores critic versions on held-out items; a plain class, run as a Ray actor by the driver."""

    def __init__(self, model: str, items: int, seed: int, style: str, batch_size: int, max_new_tokens: int,
                 torch_threads: int = 1, backend_options: dict[str, Any] | None = None,
                 run_dir: str | None = None) -> None:
        import torch

        if run_dir:
            from scrit.rundir import record_process

            record_process(run_dir, "evaluator")
        torch.set_num_threads(torch_threads)
        from scrit.backends import make_backend
        from scrit.evaluate import build_arith_evalset

        self.backend = make_backend(model, **(backend_options or {}))
        self.items = build_arith_evalset(n=items, seed=seed)
        self.style = style
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def metrics_url(self, run: str) -> str:
        """Start this actor's Prometheus exporter; generations count under role ``evaluator``."""
        if not isinstance(self.backend, telemetry.MeteredBackend):
            self.backend = telemetry.MeteredBackend(self.backend, "evaluator")
        return telemetry.start_exporter(run=run)

    def evaluate_version(self, version: int, uri: str) -> dict[str, Any]:
        """EI-F1, CC-Acc and the rest (``scrit.evaluate``) of version ``version`` loaded from ``uri``."""
        from scrit.evaluate import evaluate

        if version != self.backend.version:
            self.backend.load_weights(version, uri)
        report = evaluate(self.backend, self.items, mode="direct", batch_size=self.batch_size,
                          max_new_tokens=self.max_new_tokens, style=self.style)
        return {"version": version, **report["average"]}
