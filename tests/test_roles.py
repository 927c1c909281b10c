"""Roles, engines, the weight registry and the role and engine actors.

Role logic is checked with a scripted backend (exact texts, so exact assertions); the Ray shells run
tiny random models (junk output), so those tests assert structure: counts, versions, message types,
that a published version really changes the weights the critic's roles generate with, and that it is
loaded once by the engine they share.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    from openai_server import save_tiny_model
except ImportError:  # tests/ imported as a package
    from tests.openai_server import save_tiny_model

from scrit.actors.engines import start_engine_hosts
from scrit.actors.registry import WeightRegistry, weight_registry_actor
from scrit.actors.roles import (
    Corrector,
    Critic,
    Solver,
    Validator,
    make_role,
    pair_solutions,
    request_prompt,
)
from scrit.actors.shells import StageFailed, start_role
from scrit.backends.base import Generation, SamplingParams, truncate_at_stop
from scrit.checkpoints import VersionFollower, checkpoint_checksum, registry_path
from scrit.config import load_config
from scrit.domains.arith import ArithDomain
from scrit.engine import Engine, VersionUnavailable
from scrit.factory import CriticSettings, EngineSpec, engine_hosts, plan_run
from scrit.messages import (
    Correction,
    Critique,
    CritiqueBatch,
    ExampleBatch,
    Problem,
    ProblemBatch,
    Solution,
    SolutionBatch,
    Validation,
    WeightVersion,
    decode,
    encode,
)
from scrit.prompts import CORRECTION_MARKER, corrector_prompt, critic_prompt, solver_prompt
from scrit.selfplay import complete_critique, corrected_solution, label_solution, make_requests

ARITH = ArithDomain()
QUESTION = "Start with 12. Add 5. Multiply by 3. Subtract 4. What is the result?"
GOOD = "Step 1: 12 + 5 = 17\nStep 2: 17 * 3 = 51\nStep 3: 51 - 4 = 47\nThe answer is \\boxed{47}."
BAD = "Step 1: 12 + 5 = 17\nStep 2: 17 * 3 = 52\nStep 3: 52 - 4 = 48\nThe answer is \\boxed{48}."
HEAD = ("Step 1: 12 + 5 = 17, expected 12 + 5 = 17: correct\nStep 2: 17 * 3 = 52, expected 17 * 3 = 51: wrong\n"
        "Conclusion: incorrect, first wrong step 2\nCorrection:")
TAIL = "\nStep 2: 17 * 3 = 51\nStep 3: 51 - 4 = 47\nThe answer is \\boxed{47}."
APPROVE = ("Step 1: a: correct\nStep 2: b: correct\nStep 3: c: correct\nConclusion: correct, no wrong step\n"
           "Correction: none needed\nThe answer is \\boxed{47}.")
PROBLEM = Problem(id="p1", domain="arith", question=QUESTION, answer="47")
PROBLEM2 = Problem(id="p2", domain="arith", question="Start with 3. Add 4. Multiply by 2. What is the result?",
                   answer="14")


class Scripted:
    """An InferenceBackend whose output is ``reply(prompt)``, cut at the stop strings like a real one."""

    def __init__(self, reply: Callable[[str], str], version: int = 0) -> None:
        self.reply = reply
        self._version = version
        self.calls: list[tuple[list[str], SamplingParams]] = []
        self.loaded: list[tuple[int, str]] = []

    @property
    def version(self) -> int:
        return self._version

    def generate(self, prompts: Sequence[str], sampling: SamplingParams, **options: object) -> list[Generation]:
        self.calls.append((list(prompts), sampling))
        out = []
        for prompt in prompts:
            text, _ = truncate_at_stop(self.reply(prompt), sampling.stop)
            out.append(Generation(text=text, prompt_tokens=len(prompt), completion_tokens=len(text),
                                  version=self._version))
        return out

    def load_weights(self, version: int, path: str) -> None:
        self.loaded.append((version, path))
        self._version = version


def solution(text: str, solver: str = "s") -> Solution:
    return label_solution(ARITH, PROBLEM, text, solver, 0)


# ------------------------------------------------------------------------------------------------
# Roles with a scripted backend


def test_solver_role_counts_labels_and_seeds() -> None:
    backend = Scripted(lambda p: (GOOD if "Add 5" in p else BAD) + "\nProblem: next one", version=2)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=64, seed=7)
    role = Solver(backend, ARITH, name="seedsolver", samples_per_problem=3, sampling=sampling)
    out = role.solve([PROBLEM, PROBLEM2])
    assert len(out) == 6 and all(isinstance(s, Solution) for s in out)
    assert [s.problem_id for s in out] == ["p1"] * 3 + ["p2"] * 3
    assert all(s.solver == "seedsolver" and s.version == 2 for s in out)
    assert [s.correct for s in out] == [True] * 3 + [False] * 3  # by final answer
    assert out[0].text == GOOD  # the stop marker "\nProblem:" is cut off
    prompts, used = backend.calls[0]
    assert prompts[0] == solver_prompt(QUESTION) and used.temperature == 1.0 and used.seed == 7
    role.solve([PROBLEM])
    assert backend.calls[1][1].seed == 8  # a new seed per call: rounds must not repeat their samples
    assert role.stats()["items"] == 9


def test_critic_corrector_validator_round_trip() -> None:
    request = make_requests(PROBLEM, [solution(GOOD), solution(BAD)], random.Random(0))
    (bad_request,) = [r for r in request if not r.solution.correct]

    critic_backend = Scripted(lambda p: HEAD + TAIL + "\n(never seen)", version=5)
    critic = Critic(critic_backend, ARITH)
    (critique,) = critic.critique([bad_request])
    assert isinstance(critique, Critique) and critique.version == 5 and critique.mode == "contrastive"
    assert critique.raw_text == HEAD  # stopped at, and including, "Correction:"
    assert critique.parsed and critique.first_error_step == 1 and critique.judged_correct is False
    assert CORRECTION_MARKER in critic_backend.calls[0][1].stop
    assert critic_backend.calls[0][0] == [critic_prompt(QUESTION, BAD, bad_request.reference.text)]

    # Default corrector: the critic continues its own output.
    cont_backend = Scripted(lambda p: TAIL, version=5)
    (fix,) = Corrector(cont_backend, ARITH).correct([bad_request], [critique])
    assert cont_backend.calls[0][0] == [request_prompt(bad_request, "compact") + HEAD]
    assert isinstance(fix, Correction) and fix.text == TAIL and fix.answer == "47" and fix.version == 5
    full = complete_critique(critique, fix)
    corrected = corrected_solution(ARITH, bad_request.solution, full)
    assert corrected == GOOD

    # A separately configured corrector gets the corrector prompt instead.
    sep_backend = Scripted(lambda p: TAIL, version=0)
    Corrector(sep_backend, ARITH, continue_critique=False).correct([bad_request], [critique])
    assert sep_backend.calls[0][0] == [corrector_prompt(QUESTION, BAD, HEAD)]

    # Validator: a direct critique of the corrected solution, plus the final-answer check.
    val_backend = Scripted(lambda p: APPROVE, version=5)
    validator = Validator(val_backend, ARITH)
    wrong_fix = corrected.replace("47", "46")
    ok, wrong = validator.validate([PROBLEM, PROBLEM], [corrected, wrong_fix])
    assert val_backend.calls[0][0][0] == critic_prompt(QUESTION, corrected, None)  # no reference
    assert isinstance(ok, Validation) and ok.passed and ok.verdict_correct and ok.answer_matches
    assert not wrong.passed and wrong.verdict_correct and wrong.answer_matches is False
    lax = Validator(Scripted(lambda p: APPROVE), ARITH, require_answer_match=False)
    (lax_result,) = lax.validate([PROBLEM], [wrong_fix])
    assert lax_result.passed and lax_result.answer_matches is None
    reject = Validator(Scripted(lambda p: HEAD), ARITH)
    assert not reject.validate([PROBLEM], [corrected])[0].passed
    junk = Validator(Scripted(lambda p: "zzz"), ARITH).validate([PROBLEM], [corrected])[0]
    assert not junk.passed and junk.verdict_correct is None


def test_unparseable_critique_gets_empty_correction_without_generation() -> None:
    requests = make_requests(PROBLEM, [solution(GOOD, "a"), solution(GOOD, "b"), solution(BAD)], random.Random(0))
    assert len(requests) == 3
    critiques = Critic(Scripted(lambda p: "gibberish with no verdict"), ARITH).critique(requests)
    assert len(critiques) == len(requests) and not any(c.parsed for c in critiques)
    assert all(c.first_error_step == -1 and c.judged_correct is None for c in critiques)
    backend = Scripted(lambda p: TAIL)
    fixes = Corrector(backend, ARITH).correct(requests, critiques)
    assert [f.text for f in fixes] == [""] * len(requests) and backend.calls == []  # nothing generated
    assert all(f.steps == [] and f.answer is None for f in fixes)
    with pytest.raises(ValueError):
        Corrector(backend, ARITH).correct(requests, critiques[:1])


def test_the_engine_swaps_between_requests_and_every_role_sees_the_new_version(tmp_path: Path) -> None:
    """Roles share one engine; it asks its VersionFollower before requests (rate-limited) and loads a
    version once, whichever role asked; outputs carry the version that made them."""
    good_dir = _fake_checkpoint(tmp_path / "v1", b"one")
    backend = Scripted(lambda p: APPROVE)
    engine = Engine("critic", backend, VersionFollower(tmp_path / "run", backend, "critic"), poll_s=0.0)
    critic, validator = Critic(engine, ARITH), Validator(engine, ARITH)
    requests = make_requests(PROBLEM, [solution(GOOD), solution(BAD)], random.Random(0))
    assert {c.version for c in critic.critique(requests)} == {0} and backend.loaded == []
    registry = WeightRegistry(tmp_path / "run", good_dir)
    registry.publish(WeightVersion(version=1, uri=str(good_dir), checksum=checkpoint_checksum(good_dir)))
    assert {c.version for c in critic.critique(requests)} == {1}
    assert {v.version for v in validator.validate([PROBLEM], [GOOD])} == {1}
    assert backend.loaded == [(1, str(good_dir))]  # loaded once for both roles
    assert engine.stats()["swaps"] == 1 and engine.stats()["last_swap_s"] is not None
    assert critic.stats()["version"] == validator.stats()["version"] == 1
    # A caller that needs a newer version than is published gets a clear error, not older output.
    with pytest.raises(VersionUnavailable, match="version 2 requested"):
        engine.generate(["x"], SamplingParams(), min_version=2)
    # Rate-limited: with a long poll interval a new version is only looked for when asked for.
    lazy_backend = Scripted(lambda p: APPROVE)
    lazy = Engine("critic", lazy_backend, VersionFollower(tmp_path / "run", lazy_backend, "c"), poll_s=3600)
    assert lazy.sync() == 1  # the first call looks
    registry.publish(WeightVersion(version=2, uri=str(good_dir), checksum=checkpoint_checksum(good_dir)))
    assert lazy.sync() == 1 and lazy.sync(min_version=2) == 2


# ------------------------------------------------------------------------------------------------
# Registry (plain class)


def _fake_checkpoint(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "config.json").write_text("{}")
    return path


def test_checkpoint_checksum(tmp_path: Path) -> None:
    a = _fake_checkpoint(tmp_path / "a", b"weights")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (b / "tokenizer.json").write_text("ignored")
    assert checkpoint_checksum(a) == checkpoint_checksum(b)
    (b / "model.safetensors").write_bytes(b"weightz")
    assert checkpoint_checksum(a) != checkpoint_checksum(b)
    with pytest.raises(FileNotFoundError):
        checkpoint_checksum(tmp_path / "missing")


def test_registry_publish_persist_resume(tmp_path: Path) -> None:
    seed = _fake_checkpoint(tmp_path / "seed", b"seed")
    v1 = _fake_checkpoint(tmp_path / "v1", b"v1")
    registry = WeightRegistry(tmp_path / "run", seed)
    assert registry.latest().version == 0 and registry.latest().uri == str(seed)
    assert registry.latest().checksum == checkpoint_checksum(seed)
    published = WeightVersion(version=1, uri=str(v1), checksum=checkpoint_checksum(v1), step=25)
    registry.publish(published)
    for stale in (0, 1):
        with pytest.raises(ValueError):
            registry.publish(WeightVersion(version=stale, uri="x", checksum=""))
    registry.publish(WeightVersion(version=3, uri="v3", checksum="c3", step=75))
    assert [v.version for v in registry.history()] == [0, 1, 3]
    assert registry.get(1) == published
    with pytest.raises(KeyError):
        registry.get(2)

    # --resume: a new registry over the same run directory reloads the published versions.
    again = WeightRegistry(tmp_path / "run", seed)
    assert again.history() == registry.history() and again.resumed == 2
    # A crash mid-write leaves a torn last line: it is cut off, and publishing continues cleanly.
    path = registry_path(tmp_path / "run")
    with path.open("ab") as handle:
        handle.write(b'{"type":"WeightVersion","version":4,"ur')
    torn = WeightRegistry(tmp_path / "run", seed)
    assert torn.latest().version == 3
    torn.publish(WeightVersion(version=4, uri="v4", checksum="c4"))
    assert [json.loads(line)["version"] for line in path.read_text().splitlines()] == [1, 3, 4]
    # Corruption in the middle is not silently skipped.
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError):
        WeightRegistry(tmp_path / "run", seed)
    # A seed behind an HTTP endpoint has no local checkpoint to hash.
    remote = WeightRegistry(tmp_path / "other", "http://127.0.0.1:9/v1")
    assert remote.latest().checksum == "" and remote.latest().uri == "http://127.0.0.1:9/v1"


def test_registry_stop_flag(tmp_path: Path) -> None:
    registry = WeightRegistry(tmp_path / "run", _fake_checkpoint(tmp_path / "seed", b"seed"))
    assert not registry.stop_requested()
    registry.request_stop()
    assert registry.stop_requested()


# ------------------------------------------------------------------------------------------------
# Ray shells on tiny random models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_model(str(root / "a"), seed=0), save_tiny_model(str(root / "b"), seed=1)


CRITIC_SAMPLING = SamplingParams(max_new_tokens=24)


def test_registry_actor_is_named_and_shared(ray_session, tmp_path: Path, tiny_models: tuple[str, str]) -> None:
    ray = ray_session
    name = f"scrit-registry-{uuid.uuid4().hex[:8]}"
    first = weight_registry_actor(tmp_path / "run", tiny_models[0], name=name)
    second = weight_registry_actor(tmp_path / "run", tiny_models[0], name=name)  # joins, does not fail
    ray.get(second.publish.remote(WeightVersion(version=1, uri=tiny_models[1], checksum="c")))
    assert ray.get(first.latest.remote()).version == 1
    assert ray.get(ray.get_actor(name).history.remote())[0].checksum == checkpoint_checksum(tiny_models[0])
    ray.get(first.request_stop.remote())
    assert ray.get(second.stop_requested.remote())
    ray.kill(first)


def _batch(batch_id: int = 0) -> ProblemBatch:
    return ProblemBatch(batch_id=batch_id, problems=[PROBLEM, PROBLEM2])


def _solutions(batch_id: int = 0) -> SolutionBatch:
    parts = [solution(GOOD, "a"), solution(GOOD, "b"), solution(BAD)]
    parts.append(label_solution(ARITH, PROBLEM2, "Step 1: 3 + 4 = 7\nStep 2: 7 * 2 = 15\nThe answer is \\boxed{15}.",
                                "s", 0))
    return SolutionBatch(batch_id=batch_id, solver="s", solutions=parts)


def _engine(name: str, model: str, follows: bool) -> EngineSpec:
    return EngineSpec(name=name, model=model, backend="hf", device="cpu", batch_size=8, follows=follows,
                      num_cpus=0.25)


def _role(kind: str, engine: EngineSpec, sampling: SamplingParams, settings: object, name: str = ""):
    from scrit.factory import RoleSpec

    return RoleSpec(name=name or kind, kind=kind, engine=engine, sampling=sampling, settings=settings)


def test_published_version_changes_the_weights_of_every_role_on_the_shared_engine(
        ray_session, tmp_path: Path, tiny_models: tuple[str, str]) -> None:
    """The key hot-swap test: after publishing model B as version 1, the critic, corrector and validator
    actors (one engine actor between them) generate exactly what model B gives directly, and the
    engine loaded the version once."""
    ray = ray_session
    from scrit.backends.hf import HFBackend
    from scrit.factory import CorrectorSettings, ValidatorSettings

    model_a, model_b = tiny_models
    run_dir = tmp_path / "run"
    registry = weight_registry_actor(run_dir, model_a, name=f"reg-{uuid.uuid4().hex[:8]}")
    spec = _engine("critic", model_a, follows=True)
    prefix = f"{uuid.uuid4().hex[:8]}/"
    (host,) = engine_hosts([spec], colocate=False)
    engines = start_engine_hosts([host], str(run_dir), prefix=prefix)
    names = [host.name]
    pairing = CriticSettings(mode="contrastive", max_per_class=2, reference_as_correct=True, seed=3)
    critic = start_role(_role("critic", spec, CRITIC_SAMPLING, pairing), names, str(run_dir), prefix=prefix)
    corrector = start_role(_role("corrector", spec, SamplingParams(max_new_tokens=16), CorrectorSettings()), names,
                           str(run_dir), prefix=prefix)
    validator = start_role(_role("validator", spec, SamplingParams(max_new_tokens=16), ValidatorSettings()), names,
                           str(run_dir), prefix=prefix)
    requests, _ = pair_solutions(_batch(), [_solutions()], ARITH, pairing)

    before = decode(ray.get(critic.stage.remote(encode(_batch()), encode(_solutions()))), CritiqueBatch)
    assert before.requests == requests and all(c.version == 0 for c in before.critiques)
    assert before.counts == {"problems": 2, "solutions": 4, "solutions_correct": 2, "critiques": len(requests)}

    ray.get(registry.publish.remote(WeightVersion(version=1, uri=model_b, checksum=checkpoint_checksum(model_b))))
    time.sleep(0.3)  # the engine looks at the registry at most every 0.2 s
    after = decode(ray.get(critic.stage.remote(encode(_batch(1)), encode(_solutions(1)))), CritiqueBatch)
    assert all(isinstance(c, Critique) and c.version == 1 for c in after.critiques)

    direct_a = Critic(HFBackend(model_a, device="cpu"), ARITH, sampling=CRITIC_SAMPLING).critique(requests)
    direct_b = Critic(HFBackend(model_b, device="cpu"), ARITH, sampling=CRITIC_SAMPLING).critique(requests)
    assert [c.raw_text for c in before.critiques] == [c.raw_text for c in direct_a]
    assert [c.raw_text for c in after.critiques] == [c.raw_text for c in direct_b]
    assert [c.raw_text for c in after.critiques] != [c.raw_text for c in before.critiques]

    corrected = decode(ray.get(corrector.stage.remote(encode(after))), CritiqueBatch)
    assert len(corrected.corrections) == len(after.critiques)
    for critique, fix in zip(after.critiques, corrected.corrections):
        assert fix.version == 1 and (critique.parsed or fix.text == "")  # unparseable critiques get none
    examples = decode(ray.get(validator.stage.remote(encode(corrected))), ExampleBatch)
    assert examples.batch_id == 1 and ray.get(validator.stats.remote())["version"] in (0, 1)
    assert set(examples.counts) >= {"parsed", "consistent", "validated", "critic_version"}
    assert [t.stage for t in examples.timings] == ["critique", "correct", "validate"]
    engine_stats = ray.get(engines[host.name].stats.remote())["critic"]
    assert engine_stats["swaps"] == 1 and engine_stats["version"] == 1  # one load for three roles
    for actor in (critic, corrector, validator, registry, *engines.values()):
        ray.kill(actor)


def test_solver_actor_and_a_failing_stage_named_after_its_role(ray_session, tiny_models: tuple[str, str]) -> None:
    ray = ray_session
    from scrit.factory import SolverSettings

    spec = _engine("solver0-tiny", tiny_models[0], follows=False)
    prefix = f"{uuid.uuid4().hex[:8]}/"
    spec = msgspec.structs.replace(spec, nice=7)
    hosts = engine_hosts([spec], colocate=True)
    assert hosts[0].nice == 7
    engines = start_engine_hosts(hosts, None, prefix=prefix)
    role = _role("solver", spec, SamplingParams(temperature=1.0, max_new_tokens=16, seed=3),
                 SolverSettings(samples_per_problem=2), name="solver0-tiny")
    solver = start_role(role, [hosts[0].name], None, prefix=prefix)
    out = decode(ray.get(solver.stage.remote(encode(_batch(4)))), SolutionBatch)
    assert out.batch_id == 4 and out.solver == "solver0-tiny" and [t.stage for t in out.timings] == ["solve"]
    assert [s.problem_id for s in out.solutions] == ["p1", "p1", "p2", "p2"]
    assert all(s.solver == "solver0-tiny" and s.version == 0 and isinstance(s.correct, bool) for s in out.solutions)
    assert all(s.correct == ARITH.answers_equal(s.answer, "47" if s.problem_id == "p1" else "14")
               for s in out.solutions)
    # The same batch gets the same samples (seeded by batch id), whichever call runs it.
    again = decode(ray.get(solver.stage.remote(encode(_batch(4)))), SolutionBatch)
    assert [s.text for s in again.solutions] == [s.text for s in out.solutions]
    assert ray.get(solver.stats.remote())["items"] == 8
    # The engine host runs below normal priority, every thread of it (the generating ones included), so the
    # trainer goes first where processes outnumber cores.
    pid = ray.get(engines[hosts[0].name].__ray_call__.remote(lambda host: os.getpid()))
    # Ray starts a worker's own threads at this process's nice value and its main thread at 15 more
    # (RAY_worker_niceness), so every thread is at least 7 only if each one was reniced.
    niceness = [os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]
    assert min(niceness) >= min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7), niceness
    # A stage that raises names its actor, whatever Ray calls the method.
    with pytest.raises(StageFailed) as caught:
        ray.get(solver.stage.remote(b"not a batch"))
    assert caught.value.component == "solver0-tiny.0" and "MessageDecodeError" in caught.value.message
    for actor in (solver, *engines.values()):
        ray.kill(actor)


def test_make_role_builds_every_role_of_the_default_plan() -> None:
    plan = plan_run(load_config(None))
    engine = Scripted(lambda p: APPROVE)
    kinds = {spec.name: type(make_role(spec, engine if spec.engine else None)).__name__ for spec in plan.roles}
    assert kinds == {"solver0-careless": "Solver", "critic": "Critic", "corrector": "Corrector",
                     "validator": "Validator", "evaluator": "Evaluator"}
    assert {spec.engine.name for spec in plan.roles if spec.kind != "solver"} == {"critic"}  # one shared engine
    assert [e.name for e in plan.engines] == ["critic", "solver0-careless"]
    # On CPU both models share one host process; a cluster config gives each replica its own actor.
    assert [(h.name, [e.name for e in h.engines]) for h in plan.hosts] == [("engines.0", ["critic", "solver0-careless"])]
    assert plan.hosts[0].nice == 10 and plan_run(load_config(None, ["resources.engine_nice=0"])).hosts[0].nice == 0
    split = plan_run(load_config(None, ["resources.colocate_engines=false", "critic.engines=2"]))
    assert [h.name for h in split.hosts] == ["critic-engine.0", "critic-engine.1", "solver0-careless-engine.0"]
    assert split.hosts_of(split.engines[0]) == ["critic-engine.0", "critic-engine.1"]


def test_the_validator_judges_corrections_and_keeps_confirmed_correct_verdicts() -> None:
    """A critique that calls a right-answer solution correct corrects nothing: its final answer confirms
    it, so it is kept without a second judgment (rejudge_correct=False); corrections are judged."""
    good, bad = solution(GOOD), solution(BAD)
    requests = [r for r in make_requests(PROBLEM, [good, solution(GOOD, "b"), bad], random.Random(0))
                if r.reference is not None]
    assert sorted(r.solution.correct for r in requests) == [False, True, True]
    critic = Critic(Scripted(lambda p: HEAD if "52" in p.split("Student:")[-1] else APPROVE.split("Correction:")[0]
                             + "Correction:"), ARITH)
    critiques = critic.critique(requests)
    corrections = Corrector(Scripted(lambda p: TAIL if "wrong" in p.split("Critique:")[-1]
                                     else " none needed\nThe answer is \\boxed{47}."), ARITH).correct(requests, critiques)
    batch = CritiqueBatch(batch_id=0, requests=requests, critiques=critiques, corrections=corrections,
                          counts={"critiques": len(requests)})
    for rejudge, judged in ((False, 1), (True, 3)):
        judge = Scripted(lambda p: APPROVE)
        out = Validator(judge, ARITH, rejudge_correct=rejudge).validate_batch(batch)
        assert out.counts["judged"] == judged == sum(len(prompts) for prompts, _ in judge.calls)
        assert out.counts["validated"] == len(requests)  # the judge approves everything here
    # A judge that rejects everything keeps only the confirmed correct verdicts.
    out = Validator(Scripted(lambda p: HEAD), ARITH).validate_batch(batch)
    assert [e.student_correct for e in out.examples] == [True] * sum(r.solution.correct for r in requests)
