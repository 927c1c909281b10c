"""Fit the training to the run's wall budget: fewer optimizer steps per version on a slower machine,
so that every version is published and the learning-rate schedule ends, instead of a run that stops
at its wall limit part-way through its schedule (``train.fit_wall_budget``; docs/learning.md).

Measured before this existed: the default run confined to one core published 2 of its 6 versions,
stopped a third of the way down its cosine at a high learning rate, and left a critic worse than the
seed on correct solutions. ``StepBudget`` re-plans from the trainer's measured seconds per step: the
versions still to publish share the steps the time left affords, ``steps_per_version`` at most (a fast
machine trains exactly as configured), ``MIN_STEPS_PER_VERSION`` at least.

Ray-free and clock-free (the caller passes the time), so it is tested directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["StepBudget", "MIN_STEPS_PER_VERSION", "FINAL_RESERVE_SHARE", "training_deadline", "last_step"]

MIN_STEPS_PER_VERSION = 5  # below this a version is noise; a machine this slow overruns the budget instead
FINAL_RESERVE_SHARE = 0.1  # of run.max_wall_seconds, kept after the last version for its evaluation
# (the final in-run evaluation took 37 s of an 840 s run on two cores and 60-120 s on one)


def training_deadline(started_at: float, max_wall_seconds: float) -> float:
    """When (``time.time()``) the last version should be published: the run's wall limit less the share
    kept for the final evaluation and shutdown."""
    return started_at + max_wall_seconds * (1.0 - FINAL_RESERVE_SHARE)


def last_step(published_step: int, steps_into_version: int, steps_per_version: int, versions_left: int) -> int:
    """The optimizer step the last version lands on, where the learning-rate schedule ends: the version
    in progress ends at its planned size (or now, if it already has more steps), each later one takes
    ``steps_per_version``."""
    return published_step + max(steps_into_version, steps_per_version) + (versions_left - 1) * steps_per_version


@dataclass(frozen=True)
class StepBudget:
    """Steps per version for the versions left, from the deadline and the measured pace."""

    steps_per_version: int  # the configured (and largest) size of a version
    deadline: float | None  # None: no budget to fit, every version gets steps_per_version

    def plan(self, now: float, seconds_per_step: float | None, versions_left: int, steps_into_version: int) -> int:
        """Steps for each of the ``versions_left`` versions (the one in progress, ``steps_into_version``
        steps in, counts as one): as many as fit before the deadline at ``seconds_per_step``, shared
        evenly, between ``MIN_STEPS_PER_VERSION`` and ``steps_per_version``."""
        if self.deadline is None or not seconds_per_step or seconds_per_step <= 0 or versions_left <= 0:
            return self.steps_per_version
        affordable = max(0.0, self.deadline - now) / seconds_per_step + steps_into_version
        per_version = math.floor(affordable / versions_left)
        return max(min(MIN_STEPS_PER_VERSION, self.steps_per_version), min(self.steps_per_version, per_version))
