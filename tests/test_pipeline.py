"""The streaming producer pipeline (``actors/pipeline.py``) on a real local Ray with the shipped seed.

One pipeline run of a few batches (greedy decoding) is checked against what it must guarantee:
stages of different batches overlap (read from the timestamps each stage records, not from wall
time), no more than ``batches_in_flight`` batches are ever in the pipeline and the buffer's room is a
budget (the batches in flight count against it), data flows actor to actor (the driver only gets small
reports), the kept examples are exactly what the synchronous, in-process path makes of the same
batches with roles built by the same factory, a stage that fails is named by its actor, and a batch
lost with an actor is sent again after waits that double, then fails naming that actor.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ray = pytest.importorskip("ray")

import time  # noqa: E402

from scrit.actors.pipeline import BatchFailed, ProducerPipeline, _InFlight  # noqa: E402
from scrit.actors.replay_buffer import replay_buffer_actor  # noqa: E402
from scrit.actors.roles import make_role, run_batch_locally  # noqa: E402
from scrit.config import config_from_dict  # noqa: E402
from scrit.factory import open_engine, plan_run  # noqa: E402
from scrit.messages import ProblemBatch, TrainingExample  # noqa: E402
from scrit.problems import ProblemSource  # noqa: E402
from scrit.replay_log import RecordLog  # noqa: E402
from scrit.rundir import buffer_log_path  # noqa: E402

BATCHES = 4
IN_FLIGHT = 3
CONFIG = {
    "run": {"problems_per_batch": 4, "batches_in_flight": IN_FLIGHT, "seed": 7, "max_per_class": 1,
            "heldout_eval_items": 0},
    "critic": {"backend": "hf", "max_new_tokens": 400, "batch_size": 16, "device": "cpu"},
    # the careless solver, greedy: ~28 % wrong solutions, so most batches have something to critique
    "solvers": [{"model": "careless", "backend": "hf", "temperature": 0.0, "samples_per_problem": 1,
                 "max_new_tokens": 160, "device": "cpu"}],
    "buffer": {"max_ahead": 1000},
    "faults": {"batch_retries": 2, "batch_retry_backoff_s": 0.5},
}


@pytest.fixture(scope="module")
def streamed(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run BATCHES batches through the actor pipeline, recording the in-flight count at every step."""
    cfg = config_from_dict(CONFIG)
    run_dir = tmp_path_factory.mktemp("pipeline")
    buffer = replay_buffer_actor(num_cpus=0.05, run_dir=str(run_dir), max_ahead=1000)
    pipeline = ProducerPipeline(cfg, plan_run(cfg), run_dir, buffer, ProblemSource(cfg))
    pipeline.wait_ready()
    # The buffer's room is a budget: each batch in flight counts as the examples it is expected to bring
    # (problems_per_batch = 4 before the first report).
    assert pipeline.fill(room=0) == 0  # no room in the buffer: nothing enters the pipeline
    assert pipeline.fill(room=1) == 1  # room for part of a batch: one batch, not a window of them
    assert pipeline.fill(room=4) == 0  # the batch in flight already uses that room
    assert pipeline.fill(room=1000) == IN_FLIGHT - 1  # plenty of room: the window fills up
    reports, in_flight = [], []
    while len(reports) < BATCHES:
        while pipeline.next_batch_id < BATCHES and len(pipeline.in_flight) < IN_FLIGHT:
            pipeline.submit()  # one at a time up to BATCHES (fill would top the window up past it)
        in_flight.append(len(pipeline.in_flight))
        reports += pipeline.collect(timeout=0.5)
    # A stage that raises fails the batch naming its actor (solver0-careless.0, not "pipeline"): here the
    # solver gets bytes that are not a ProblemBatch, and every later stage passes its error on.
    broken = _InFlight(99, ray.put(b"not a problem batch"), time.time())
    pipeline._send(broken)
    with pytest.raises(BatchFailed) as failed:
        while pipeline.in_flight:
            pipeline.collect(timeout=1.0)
    stats = pipeline.stats()
    # A batch lost with an actor (the validator, killed for good) is sent again after each wait, then fails.
    ray.kill(pipeline.roles["validator"].handles[0], no_restart=True)
    sends: list[tuple[int, float]] = []  # (attempt, when) for every time the batch entered the pipeline
    send = pipeline._send
    pipeline._send = lambda batch: (sends.append((batch.attempt, time.monotonic())), send(batch))
    pipeline.submit()
    with pytest.raises(BatchFailed) as lost:
        while pipeline.moving:
            pipeline.collect(timeout=0.1)
    yield {"cfg": cfg, "reports": reports, "in_flight": in_flight, "run_dir": run_dir, "stats": stats,
           "failed": failed.value, "lost": lost.value, "sends": sends, "retries": list(pipeline.retries)}
    for handle in [*pipeline.actors().values(), buffer]:
        ray.kill(handle)


def _overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_batches_overlap_in_the_pipeline(streamed: dict) -> None:
    reports = streamed["reports"]
    assert [r["batch_id"] for r in reports] == list(range(BATCHES))
    stages = {r["batch_id"]: {t["stage"]: t for t in r["timings"]} for r in reports}
    assert all(set(s) == {"solve", "critique", "correct", "validate", "put"} for s in stages.values())
    for timing in stages.values():  # within a batch the stages run in order
        assert timing["solve"]["end"] <= timing["critique"]["start"] <= timing["critique"]["end"]
        assert timing["critique"]["end"] <= timing["correct"]["start"] <= timing["correct"]["end"]
        assert timing["correct"]["end"] <= timing["validate"]["start"] <= timing["put"]["start"]
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
    # One critic engine served the critic, corrector and validator: they all went to it. Both models'
    # engines live in one host process (resources.colocate_engines, the CPU default).
    engines = stats["engines.0"]
    assert engines["critic"]["requests"] >= stats["critic.0"]["batches"] + stats["corrector.0"]["batches"]
    assert engines["solver0-careless"]["requests"] == stats["solver0-careless.0"]["batches"]


def test_a_failing_stage_is_named_by_its_actor(streamed: dict) -> None:
    failed = streamed["failed"]
    assert failed.component == "solver0-careless.0", failed
    assert "MessageDecodeError" in str(failed)


def test_a_lost_batch_is_sent_again_after_waits_that_double(streamed: dict) -> None:
    attempts = [attempt for attempt, _ in streamed["sends"]]
    assert attempts == [0, 1, 2]  # the first send and faults.batch_retries resends, then the run would fail
    gaps = [later - earlier for (_, earlier), (_, later) in zip(streamed["sends"], streamed["sends"][1:])]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0, gaps  # batch_retry_backoff_s, then twice that
    assert [retry["wait_s"] for retry in streamed["retries"]] == [0.5, 1.0]
    assert streamed["lost"].component == "validator.0", streamed["lost"]


def test_streaming_keeps_the_same_examples_as_the_synchronous_path(streamed: dict) -> None:
    """Same stage code, same seeds: the actor pipeline and the in-process chain agree example by example."""
    cfg, run_dir = streamed["cfg"], streamed["run_dir"]
    log = RecordLog(buffer_log_path(run_dir), expected=TrainingExample, readonly=True)  # the actor owns it
    streamed_examples = sorted((e.problem_id, e.prompt, e.target, e.student_correct) for e in log.read_all())

    plan = plan_run(cfg)  # the roles the actors run, built by the same factory, on in-process engines
    engines = {spec.name: open_engine(spec) for spec in plan.engines}
    roles = {spec.name: make_role(spec, engines[spec.engine.name]) for spec in plan.roles}
    source = ProblemSource(cfg)
    local = []
    for batch_id in range(BATCHES):
        batch = ProblemBatch(batch_id=batch_id, problems=source.take(cfg.run.problems_per_batch))
        local += run_batch_locally(batch, [roles["solver0-careless"]], roles["critic"], roles["corrector"],
                                   roles["validator"]).examples
    assert local, "the seed kept nothing: the comparison would be empty"
    assert sorted((e.problem_id, e.prompt, e.target, e.student_correct) for e in local) == streamed_examples
    assert sum(r["kept"] for r in streamed["reports"]) == len(local)


def test_reports_carry_counts_not_data(streamed: dict) -> None:
    for report in streamed["reports"]:
        assert {"problems", "solutions", "critiques", "parsed", "consistent", "validated", "kept"} <= set(report)
        assert "examples" not in report and report["problems"] == 4
        assert report["consistent"] <= report["parsed"] <= report["critiques"]
        assert report["kept"] == report["validated"] <= report["consistent"]
