"""Where a run's training problems come from (Ray-free): problems with known final answers only.

arith draws from the 'train' hash bucket (``scrit.domains.arith.arith_split``), so no held-out
evaluation problem is ever trained on; gsm8k reads the configured JSONL.
"""

from __future__ import annotations

import random

from scrit.config import ScritConfig
from scrit.messages import Problem

__all__ = ["ProblemSource"]


class ProblemSource:
    """An endless, deterministic sequence of training problems (the pool, cycled)."""

    def __init__(self, cfg: ScritConfig, skip: int = 0) -> None:
        self.cfg = cfg
        self.pool = self._load_pool()
        self.position = skip % len(self.pool)

    def _load_pool(self) -> list[Problem]:
        domain = self.cfg.domain
        if domain.name == "arith":
            from scrit.domains.arith import generate_split_problem, render_solution

            rng = random.Random(self.cfg.run.seed)
            pool = []
            for i in range(domain.num_problems):
                # the draw for a long problem only when asked for: long_share 0 gives the pool runs drew before it
                long = domain.long_share > 0 and rng.random() < domain.long_share
                ops = (domain.max_ops + 1, domain.long_max_ops) if long else (domain.min_ops, domain.max_ops)
                problem = generate_split_problem(rng, "train", *ops)
                pool.append(Problem(id=f"arith-train-{self.cfg.run.seed}-{i}", domain="arith",
                                    question=problem.text, answer=str(problem.answer),
                                    reference=render_solution(problem.correct_steps())))
            return pool
        from scrit.domains.gsm8k import load_gsm8k

        if not domain.data_path:
            raise ValueError("domain.data_path must point at a GSM8K JSONL file for domain gsm8k")
        pool = load_gsm8k(domain.data_path, limit=domain.num_problems)
        if not pool:
            raise ValueError(f"no problems in {domain.data_path}")
        return pool

    def take(self, n: int) -> list[Problem]:
        batch = []
        for _ in range(n):
            batch.append(self.pool[self.position])
            self.position = (self.position + 1) % len(self.pool)
        return batch
