"""The wall-budget plan (train/budget.py): how many optimizer steps the versions still to publish get."""

from __future__ import annotations

import pytest

from scrit.train.budget import FINAL_RESERVE_SHARE, MIN_STEPS_PER_VERSION, StepBudget, last_step, training_deadline


def test_a_fast_machine_trains_exactly_as_configured() -> None:
    budget = StepBudget(steps_per_version=50, deadline=1000.0)
    # 6 versions x 50 steps at 2 s a step need 600 s; 900 s are left
    assert budget.plan(now=100.0, seconds_per_step=2.0, versions_left=6, steps_into_version=0) == 50


def test_a_slow_machine_shares_the_time_left_between_the_versions_left() -> None:
    budget = StepBudget(steps_per_version=50, deadline=1000.0)
    # 500 s left at 5 s a step = 100 steps more; 20 already into the current version: 120 over 4 versions
    assert budget.plan(now=500.0, seconds_per_step=5.0, versions_left=4, steps_into_version=20) == 30


def test_the_plan_never_goes_below_the_minimum_nor_above_the_configured_size() -> None:
    budget = StepBudget(steps_per_version=50, deadline=1000.0)
    assert budget.plan(now=2000.0, seconds_per_step=5.0, versions_left=3, steps_into_version=0) == MIN_STEPS_PER_VERSION
    assert budget.plan(now=0.0, seconds_per_step=0.01, versions_left=1, steps_into_version=0) == 50
    small = StepBudget(steps_per_version=2, deadline=10.0)  # a version smaller than the minimum stays as asked
    assert small.plan(now=100.0, seconds_per_step=1.0, versions_left=1, steps_into_version=0) == 2


@pytest.mark.parametrize("deadline, pace, left",
                         [(None, 2.0, 3), (1000.0, None, 3), (1000.0, 0.0, 3), (1000.0, 2.0, 0)])
def test_without_a_deadline_or_a_measured_pace_the_configured_size_holds(deadline, pace, left) -> None:
    assert StepBudget(steps_per_version=40, deadline=deadline).plan(500.0, pace, left, 0) == 40


def test_the_deadline_keeps_a_share_of_the_run_for_the_final_evaluation() -> None:
    assert training_deadline(1000.0, 840.0) == pytest.approx(1000.0 + 840.0 * (1 - FINAL_RESERVE_SHARE))


def test_the_schedule_ends_where_the_last_version_lands() -> None:
    assert last_step(published_step=0, steps_into_version=0, steps_per_version=50, versions_left=6) == 300
    # re-planned to 20 a version, 30 steps into version 2 (published at 50): it ends now, then 4 x 20
    assert last_step(published_step=50, steps_into_version=30, steps_per_version=20, versions_left=5) == 160
    assert last_step(published_step=50, steps_into_version=10, steps_per_version=20, versions_left=5) == 150
