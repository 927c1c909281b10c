"""The streaming producer pipeline (``actors/pipeline.py``) on a real local Ray with the shipped seed.

One pipeline run of a few batches (greedy decoding) is checked against what it must guarantee:
stages of different batches overlap (read from the timestamps each stage records, not from wall
time), no more than ``batches_in_flight`` batches are ever in the pipeline and none is submitted
without buffer room, data flows actor to actor (the driver only gets small reports), and the kept
examples are exactly what the synchronous, in-process path makes of the same batches.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ray = pytest.importorskip("ray")

from scrit.actors.pipeline import ProducerPipeline  # noqa: E402
from scrit.actors.replay_buffer import buffer_log_path, replay_buffer_actor  # noqa: E402
from scrit.actors.roles import Critic, PairingSettings, Solver, Validator, run_batch_locally  # noqa: E402
from scrit.backends import make_backend, resolve_model_path  # noqa: E402
from scrit.backends.base import SamplingParams  # noqa: E402
from scrit.config import config_from_dict  # noqa: E402
from scrit.domains.arith import ArithDomain  # noqa: E402
from scrit.messages import ProblemBatch, TrainingExample  # noqa: E402
from scrit.problems import ProblemSource  # noqa: E402
from scrit.replay_log import RecordLog  # noqa: E402

BATCHES = 4
IN_FLIGHT = 3
CONFIG = {
    "run": {"problems_per_batch": 4, "batches_in_flight": IN_FLIGHT, "seed": 7, "max_per_class": 1},
    "critic": {"backend": "hf", "max_new_tokens": 400, "batch_size": 16, "device": "cpu"},
    # the careless solver, greedy: ~28 % wrong solutions, so most batches have something to critique
    "solvers": [{"model": "careless", "backend": "hf", "temperature": 0.0, "samples_per_problem": 1,
                 "max_new_tokens": 160, "device": "cpu"}],
    "buffer": {"max_ahead": 1000},
    "resources": {"actor_num_cpus": 0.25},
}


@pytest.fixture(scope="module")
def ray_session():
    import torch

    torch.set_num_threads(1)
    owned = not ray.is_initialized()
    if owned:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if owned:
        ray.shutdown()


@pytest.fixture(scope="module")
def streamed(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run BATCHES batches through the actor pipeline, recording the in-flight count at every step."""
    cfg = config_from_dict(CONFIG)
    run_dir = tmp_path_factory.mktemp("pipeline")
    buffer = replay_buffer_actor(num_cpus=0.05, run_dir=str(run_dir), max_ahead=1000)
    seed = resolve_model_path("seed")
    pipeline = ProducerPipeline(cfg, run_dir, buffer, seed, "compact", False, ProblemSource(cfg))
    pipeline.wait_ready()
    assert pipeline.fill(room=0) == 0  # no room in the buffer: nothing enters the pipeline
    assert pipeline.fill(room=1) == IN_FLIGHT  # room: the window fills up
    reports, in_flight = [], []
    while len(reports) < BATCHES:
        while pipeline.next_batch_id < BATCHES and len(pipeline.in_flight) < IN_FLIGHT:
            pipeline.submit()  # one at a time up to BATCHES (fill would top the window up past it)
        in_flight.append(len(pipeline.in_flight))
        reports += pipeline.collect(timeout=0.5)
    yield {"cfg": cfg, "reports": reports, "in_flight": in_flight, "run_dir": run_dir,
           "stats": pipeline.stats()}
    for handle in [*pipeline.actors().values(), buffer]:
        ray.kill(handle)


def _overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_batches_overlap_in_the_pipeline(streamed: dict) -> None:
    reports = streamed["reports"]
    assert [r["batch_id"] for r in reports] == list(range(BATCHES))
    stages = {r["batch_id"]: {t["stage"]: t for t in r["timings"]} for r in reports}
    assert all(set(s) == {"solve", "critique", "validate", "put"} for s in stages.values())
    for timing in stages.values():  # within a batch the stages run in order
        assert timing["solve"]["end"] <= timing["critique"]["start"] <= timing["critique"]["end"]
        assert timing["critique"]["end"] <= timing["validate"]["start"] <= timing["put"]["start"]
    # Across batches they overlap: a later batch is solved while an earlier one is critiqued/validated.
    overlapping = [(i, j) for i in stages for j in stages if j > i and (
        _overlaps(stages[j]["solve"], stages[i]["critique"]) or _overlaps(stages[j]["critique"], stages[i]["validate"]))]
    assert overlapping, f"no stage overlap across batches: {stages}"


def test_the_window_bounds_the_batches_in_flight(streamed: dict) -> None:
    assert max(streamed["in_flight"]) == IN_FLIGHT  # the window was used ...
    assert all(n <= IN_FLIGHT for n in streamed["in_flight"])  # ... and never exceeded
    # Hence no actor ever had more than IN_FLIGHT calls waiting: every call belongs to a batch in flight.
    stats = streamed["stats"]
    assert stats["critic.0"]["batches"] >= 1 and stats["solver0-careless.0"]["items"] == BATCHES * 4


def test_streaming_keeps_the_same_examples_as_the_synchronous_path(streamed: dict) -> None:
    """Same stage code, same seeds: the actor pipeline and the in-process chain agree example by example."""
    cfg, run_dir = streamed["cfg"], streamed["run_dir"]
    log = RecordLog(buffer_log_path(run_dir), expected=TrainingExample, readonly=True)  # the actor owns it
    streamed_examples = sorted((e.problem_id, e.prompt, e.target, e.student_correct) for e in log.read_all())

    backend = make_backend(resolve_model_path("seed"), device="cpu", batch_size=16)
    domain = ArithDomain()
    spec = cfg.solvers[0]
    solver_backend = make_backend(resolve_model_path("careless"), device="cpu", batch_size=16)
    solver = Solver(solver_backend, domain, "solver0-careless", spec.samples_per_problem,
                    SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=0.0, seed=cfg.run.seed * 1000))
    sampling = SamplingParams(max_new_tokens=cfg.critic.max_new_tokens)
    pairing = PairingSettings(mode="contrastive", max_per_class=1, reference_as_correct=True, seed=cfg.run.seed)
    critic = Critic(backend, domain, sampling=sampling, pairing=pairing, continuation=sampling)
    validator = Validator(backend, domain, sampling=sampling)
    source = ProblemSource(cfg)
    local = []
    for batch_id in range(BATCHES):
        batch = ProblemBatch(batch_id=batch_id, problems=source.take(cfg.run.problems_per_batch))
        local += run_batch_locally(batch, [solver], critic, validator).examples
    assert local, "the seed kept nothing: the comparison would be empty"
    assert sorted((e.problem_id, e.prompt, e.target, e.student_correct) for e in local) == streamed_examples
    assert sum(r["kept"] for r in streamed["reports"]) == len(local)


def test_reports_carry_counts_not_data(streamed: dict) -> None:
    for report in streamed["reports"]:
        assert {"problems", "solutions", "critiques", "parsed", "consistent", "validated", "kept"} <= set(report)
        assert "examples" not in report and report["problems"] == 4
        assert report["consistent"] <= report["parsed"] <= report["critiques"]
        assert report["kept"] == report["validated"] <= report["consistent"]
