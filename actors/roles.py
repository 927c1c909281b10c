"""The self-play roles as plain classes: solver, critic, corrector, validator, evaluator (DESIGN.md §1).

A role generates through an *engine*: anything with ``generate(prompts, sampling)`` and ``version``
(``scrit.engine.Engine`` in-process, ``actors.engines.EnginePool`` for the shared engine actors, or a
bare ``InferenceBackend`` in tests). Engines belong to models: the critic, corrector, validator and
evaluator share the evolving critic's engine, which moves to each new version between requests; every
output message records the version that produced it. ``make_role`` builds a role from its
``scrit.factory.RoleSpec``.

Each role has a per-item method (``solve``, ``critique``, ``correct``, ``validate``) and a batch
method, the pipeline stage it runs as (``*_batch``: batch messages in, batch messages out, with the
stage's counts and timings); ``stage`` is the same on msgpack bytes, what the generic Ray shell
(``actors/shells.py``) forwards. So all of this runs and is tested without Ray, and
``run_batch_locally`` chains the same stages in one process (the synchronous reference path).

Integrity rule: the roles see problems, solutions, references (correct solutions) and the final
answer (labels, the verdict check, the validator's optional answer check), never step labels or
programmatic critiques.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from scrit import telemetry
from scrit.backends.base import Generation, SamplingParams
from scrit.domains.base import Domain
from scrit.factory import CriticSettings, RoleSpec
from scrit.messages import (
    Correction,
    Critique,
    CritiqueBatch,
    CritiqueRequest,
    ExampleBatch,
    Problem,
    ProblemBatch,
    Solution,
    SolutionBatch,
    StageTiming,
    Validation,
    decode,
    encode,
)
from scrit.prompts import CORRECTION_MARKER, critic_prompt, corrector_prompt, solver_prompt
from scrit.selfplay import (
    complete_critique,
    corrected_solution,
    critique_from_text,
    label_solution,
    make_requests,
    reference_solution,
    select_for_critique,
    training_example,
    verdict_matches_label,
)

__all__ = [
    "Corrector",
    "Critic",
    "Evaluator",
    "SOLUTION_END_STOPS",
    "Solver",
    "Validator",
    "make_role",
    "request_prompt",
    "run_batch_locally",
]


log = logging.getLogger(__name__)

# A solver that starts writing the next prompt has finished its solution (EOS is the usual end).
SOLUTION_END_STOPS: tuple[str, ...] = ("\nProblem:", "\nSolve the problem")
# A correction ends where a new critique or prompt would begin.
CORRECTION_END_STOPS: tuple[str, ...] = ("\nProblem:", "\nCritique the student")


def _with_stops(sampling: SamplingParams, stops: Sequence[str]) -> SamplingParams:
    extra = tuple(s for s in stops if s not in sampling.stop)
    return msgspec.structs.replace(sampling, stop=sampling.stop + extra) if extra else sampling


def _strip_stops(text: str, stops: Sequence[str]) -> str:
    """Remove a trailing stop marker that is not part of the output's content."""
    for stop in stops:
        if text.endswith(stop):
            return text[: -len(stop)]
    return text


class _Stage:
    """Times one stage's work on a batch: ``with _Stage("critique", actor) as t: ...; t.timing``."""

    def __init__(self, stage: str, actor: str) -> None:
        self.stage, self.actor = stage, actor

    def __enter__(self) -> "_Stage":
        self.start = time.time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timing = StageTiming(self.stage, self.actor, self.start, time.time(), getattr(self, "tokens", 0))


class _Role:
    """The engine, the role's name (its metrics label) and token bookkeeping shared by all roles."""

    def __init__(self, engine: Any, name: str) -> None:
        self.engine = engine
        self.name = name
        self.items = 0
        self.batches = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.refused_prompts = 0  # prompts over the model's context (PromptTooLong): not generated
        self.last_version = engine.version if engine is not None else 0

    @property
    def version(self) -> int:
        """The critic version of the role's latest output (its engine's, before the first)."""
        return self.last_version

    def _generate(self, prompts: Sequence[str], sampling: SamplingParams, **options: Any) -> list[Generation]:
        if not prompts:
            return []
        started = time.perf_counter()
        generations = self.engine.generate(prompts, sampling, **options)
        telemetry.record_generation(self.name, generations, time.perf_counter() - started)
        self.batches += 1
        self.items += len(generations)
        self.prompt_tokens += sum(g.prompt_tokens for g in generations)
        self.completion_tokens += sum(g.completion_tokens for g in generations)
        refused = [g.error for g in generations if g.error]
        if refused:  # empty texts: they parse as nothing and the item is dropped, as an unparsed output is
            self.refused_prompts += len(refused)
            log.warning("%s: %d prompt(s) not generated: %s", self.name, len(refused), refused[0])
        self.last_version = max(g.version for g in generations)
        return generations

    def stats(self) -> dict[str, Any]:
        """Counters for metrics and the live display: items, tokens, version."""
        return {"role": type(self).__name__, "name": self.name, "version": self.version, "items": self.items,
                "batches": self.batches, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "refused_prompts": self.refused_prompts}


class Solver(_Role):
    """Samples ``samples_per_problem`` step-by-step solutions per problem and labels them by answer."""

    def __init__(
        self,
        engine: Any,
        domain: Domain,
        name: str = "solver",
        samples_per_problem: int = 4,
        sampling: SamplingParams | None = None,
        style: str = "compact",
    ) -> None:
        super().__init__(engine, name)
        if samples_per_problem < 1:
            raise ValueError(f"samples_per_problem must be >= 1, got {samples_per_problem}")
        self.domain = domain
        self.samples_per_problem = samples_per_problem
        self.sampling = _with_stops(sampling or SamplingParams(temperature=1.0, max_new_tokens=256),
                                    SOLUTION_END_STOPS)
        self.style = style
        self._calls = 0

    def solve(self, problems: Sequence[Problem], seed_offset: int | None = None) -> list[Solution]:
        """``samples_per_problem`` Solutions per problem, grouped by problem in input order.

        With a fixed ``sampling.seed`` each call uses ``seed + seed_offset`` (default: the call
        number): repeating the seed would give every batch the same samples.
        """
        sampling = self.sampling
        offset = self._calls if seed_offset is None else seed_offset
        if sampling.seed is not None:
            sampling = msgspec.structs.replace(sampling, seed=sampling.seed + offset)
        self._calls += 1
        prompts = [solver_prompt(p.question, self.style) for p in problems for _ in range(self.samples_per_problem)]
        generations = self._generate(prompts, sampling)
        owners = [p for p in problems for _ in range(self.samples_per_problem)]
        return [
            label_solution(self.domain, problem, _strip_stops(gen.text, SOLUTION_END_STOPS).strip(), self.name,
                           gen.version)
            for problem, gen in zip(owners, generations)
        ]

    def solve_batch(self, batch: ProblemBatch, actor: str = "") -> SolutionBatch:
        """The solver stage: this solver's solutions to every problem of ``batch`` (seeded by batch id,
        so the same batch gets the same samples whichever actor of this solver runs it)."""
        tokens = self.completion_tokens
        with _Stage("solve", actor or self.name) as stage:
            solutions = self.solve(batch.problems, seed_offset=batch.batch_id)
        stage.tokens = self.completion_tokens - tokens
        return SolutionBatch(batch_id=batch.batch_id, solver=self.name, solutions=solutions, timings=[stage.timing])

    def stage(self, batch: bytes) -> bytes:
        """ProblemBatch -> SolutionBatch, as msgpack."""
        return encode(self.solve_batch(decode(batch, ProblemBatch)))


def request_prompt(request: CritiqueRequest, style: str) -> str:
    """The critic prompt for a request: contrastive with its reference, direct without one."""
    reference = request.reference.text if request.reference is not None else None
    return critic_prompt(request.problem.question, request.solution.text, reference, style)


def pair_solutions(batch: ProblemBatch, parts: Sequence[SolutionBatch], domain: Domain,
                   settings: CriticSettings) -> tuple[list[CritiqueRequest], dict[str, int]]:
    """Critique requests for one batch from every solver's solutions, and the solver-side counts.

    Uses final answers only (``Solution.correct``). Draws are seeded by ``settings.seed`` and the batch
    id, so the streaming pipeline and the synchronous path pair a batch identically.
    """
    rng = random.Random(f"{settings.seed}:{batch.batch_id}")
    by_problem: dict[str, list[Solution]] = {p.id: [] for p in batch.problems}
    for part in parts:
        for solution in part.solutions:
            by_problem[solution.problem_id].append(solution)
    solutions = [s for group in by_problem.values() for s in group]
    if settings.reference_as_correct:
        for problem in batch.problems:
            reference = reference_solution(domain, problem)
            if reference is not None and reference.correct:
                by_problem[problem.id].append(reference)
    selected = select_for_critique(by_problem, settings.max_per_class, rng)
    problems = {p.id: p for p in batch.problems}
    requests = [request for problem_id, chosen in selected.items()
                for request in make_requests(problems[problem_id], chosen, rng, settings.mode, domain)]
    counts = {"problems": len(batch.problems), "solutions": len(solutions),
              "solutions_correct": sum(s.correct for s in solutions), "critiques": len(requests)}
    return requests, counts


class Critic(_Role):
    """Writes the critique up to and including ``Correction:`` (the corrector writes what follows)."""

    def __init__(
        self,
        engine: Any,
        domain: Domain,
        style: str = "compact",
        sampling: SamplingParams | None = None,
        pairing: CriticSettings | None = None,
        name: str = "critic",
    ) -> None:
        super().__init__(engine, name)
        self.domain = domain
        self.style = style
        self.sampling = _with_stops(sampling or SamplingParams(max_new_tokens=512), (CORRECTION_MARKER,))
        self.pairing = pairing or CriticSettings()

    def critique(self, requests: Sequence[CritiqueRequest]) -> list[Critique]:
        """One Critique per request, in order; unparseable output gives ``parsed=False``, not an error."""
        generations = self._generate([request_prompt(r, self.style) for r in requests], self.sampling)
        return [critique_from_text(r.problem.id, r.mode, gen.text, gen.version) for r, gen in zip(requests, generations)]

    def critique_batch(self, batch: ProblemBatch, parts: Sequence[SolutionBatch], actor: str = "") -> CritiqueBatch:
        """The critic stage: pair the solvers' solutions and critique them (corrections come next)."""
        tokens = self.completion_tokens
        with _Stage("critique", actor or self.name) as stage:
            requests, counts = pair_solutions(batch, parts, self.domain, self.pairing)
            critiques = self.critique(requests)
            stage.tokens = self.completion_tokens - tokens
        timings = [t for part in parts for t in part.timings] + [stage.timing]
        return CritiqueBatch(batch_id=batch.batch_id, requests=requests, critiques=critiques,
                             corrections=None, counts=counts, timings=timings)

    def stage(self, batch: bytes, *solutions: bytes) -> bytes:
        """ProblemBatch + every solver's SolutionBatch -> CritiqueBatch, as msgpack."""
        parts = [decode(part, SolutionBatch) for part in solutions]
        return encode(self.critique_batch(decode(batch, ProblemBatch), parts))


def _reached_correction(critique: Critique) -> bool:
    return critique.parsed and critique.raw_text.rstrip().endswith(CORRECTION_MARKER)


class Corrector(_Role):
    """Writes the correction that completes a critique.

    ``continue_critique=True`` (default, as in the paper): ``engine`` is the critic's own engine and
    the model simply continues its critique, prompt = critic prompt + critique text (ending in
    ``Correction:``), until EOS. ``continue_critique=False``: ``engine`` is a separately configured
    corrector model prompted with ``corrector_prompt``. Either way the full critique is
    ``critique.raw_text + correction.text`` (``scrit.selfplay.complete_critique``).

    A critique that is unparseable or never reached ``Correction:`` gets an empty Correction without
    any generation: it would fail validation whatever followed.
    """

    def __init__(
        self,
        engine: Any,
        domain: Domain,
        style: str = "compact",
        sampling: SamplingParams | None = None,
        continue_critique: bool = True,
        name: str = "corrector",
    ) -> None:
        super().__init__(engine, name)
        self.domain = domain
        self.style = style
        self.continue_critique = continue_critique
        self.sampling = _with_stops(sampling or SamplingParams(max_new_tokens=256), CORRECTION_END_STOPS)

    def prompt(self, request: CritiqueRequest, critique: Critique) -> str:
        if self.continue_critique:
            return request_prompt(request, self.style) + critique.raw_text
        return corrector_prompt(request.problem.question, request.solution.text, critique.raw_text, self.style)

    def correct(self, requests: Sequence[CritiqueRequest], critiques: Sequence[Critique]) -> list[Correction]:
        """One Correction per (request, critique), in order."""
        if len(requests) != len(critiques):
            raise ValueError(f"{len(requests)} requests but {len(critiques)} critiques")
        todo = [i for i, c in enumerate(critiques) if _reached_correction(c)]
        generations = self._generate([self.prompt(requests[i], critiques[i]) for i in todo], self.sampling)
        texts = {i: _strip_stops(g.text, CORRECTION_END_STOPS) for i, g in zip(todo, generations)}
        versions = {i: g.version for i, g in zip(todo, generations)}
        out = []
        for i, (request, critique) in enumerate(zip(requests, critiques)):
            text = texts.get(i, "")
            out.append(Correction(
                problem_id=request.problem.id,
                text=text,
                steps=self.domain.split_steps(text),
                answer=self.domain.extract_answer(text),
                version=versions.get(i, critique.version),
            ))
        return out

    def correct_batch(self, batch: CritiqueBatch, actor: str = "") -> CritiqueBatch:
        """The corrector stage: fill in the corrections."""
        tokens = self.completion_tokens
        with _Stage("correct", actor or self.name) as stage:
            corrections = self.correct(batch.requests, batch.critiques)
            stage.tokens = self.completion_tokens - tokens
        return msgspec.structs.replace(batch, corrections=corrections, timings=[*batch.timings, stage.timing])

    def stage(self, batch: bytes) -> bytes:
        """CritiqueBatch -> CritiqueBatch with corrections, as msgpack."""
        return encode(self.correct_batch(decode(batch, CritiqueBatch)))


class Validator(_Role):
    """Keeps the critiques worth training on: the validator stage of the pipeline.

    A critique is kept when it parses, its conclusion agrees with the student's final-answer label
    (``require_verdict_match``), and the evolving critic itself, judging the corrected solution with
    no reference (a direct critique), says "correct, no wrong step" -- and, with
    ``require_answer_match``, the corrected solution's final answer equals the problem's. Only the
    judgment is needed, so generation stops at ``Correction:``. Without an engine (``validator.enabled:
    false``, the paper's ablation) every consistent critique is kept.
    """

    def __init__(
        self,
        engine: Any,
        domain: Domain,
        style: str = "compact",
        sampling: SamplingParams | None = None,
        require_answer_match: bool = True,
        require_verdict_match: bool = True,
        name: str = "validator",
        rejudge_correct: bool = False,
    ) -> None:
        super().__init__(engine, name)
        self.rejudge_correct = rejudge_correct
        self.domain = domain
        self.style = style
        self.require_answer_match = require_answer_match
        self.require_verdict_match = require_verdict_match
        self.sampling = _with_stops(sampling or SamplingParams(max_new_tokens=512), (CORRECTION_MARKER,))

    def validate(self, problems: Sequence[Problem], corrected_texts: Sequence[str]) -> list[Validation]:
        """One Validation per (problem, corrected solution text), in order."""
        if len(problems) != len(corrected_texts):
            raise ValueError(f"{len(problems)} problems but {len(corrected_texts)} corrected solutions")
        if self.engine is None:
            raise ValueError("this validator has no model (validator.enabled: false)")
        prompts = [critic_prompt(p.question, text, None, self.style) for p, text in zip(problems, corrected_texts)]
        generations = self._generate(prompts, self.sampling)
        out = []
        for problem, text, gen in zip(problems, corrected_texts, generations):
            critique = critique_from_text(problem.id, "direct", gen.text, gen.version)
            verdict = critique.judged_correct if critique.parsed else None
            matches = None
            if self.require_answer_match:
                matches = self.domain.answers_equal(self.domain.extract_answer(text), problem.answer)
            passed = bool(verdict) and critique.first_error_step < 0 and matches is not False
            out.append(Validation(problem_id=problem.id, passed=passed, verdict_correct=verdict,
                                  answer_matches=matches, raw_text=gen.text, version=gen.version))
        return out

    def validate_batch(self, batch: CritiqueBatch, actor: str = "") -> ExampleBatch:
        """The validator stage: the batch's kept critiques as training examples, with every count."""
        if batch.corrections is None:
            raise ValueError(f"batch {batch.batch_id} reached the validator without corrections")
        tokens = self.completion_tokens
        with _Stage("validate", actor or self.name) as stage:
            candidates = []
            for request, critique, correction in zip(batch.requests, batch.critiques, batch.corrections):
                full = complete_critique(critique, correction)
                if full.parsed:
                    candidates.append((request, full))
            counts = {**batch.counts, "parsed": len(candidates)}
            if self.require_verdict_match:
                candidates = [(r, c) for r, c in candidates if verdict_matches_label(c, r.solution)]
            counts["consistent"] = len(candidates)
            if self.engine is not None and candidates:
                # A critique that calls a solution with the right final answer correct corrects nothing:
                # the final answer already confirms it, so only corrections go to the judge (unless
                # rejudge_correct). Re-judging them kept only the correct solutions the critic already
                # recognises, and trained it to call the others wrong.
                unchanged = {id(c) for r, c in candidates
                             if not self.rejudge_correct and r.solution.correct and c.judged_correct}
                judged = [(r, c) for r, c in candidates if id(c) not in unchanged]
                texts = [corrected_solution(self.domain, r.solution, c) for r, c in judged]
                verdicts = self.validate([r.problem for r, _ in judged], texts) if judged else []
                kept = unchanged | {id(c) for (_, c), v in zip(judged, verdicts) if v.passed}
                candidates = [(r, c) for r, c in candidates if id(c) in kept]
                counts["judged"] = len(judged)
            counts["validated"] = len(candidates)
            counts["critic_version"] = max((c.version for _, c in candidates), default=-1)
            examples = [training_example(r.problem, r.solution, c.raw_text, c.version, self.style, batch.batch_id)
                        for r, c in candidates]
            stage.tokens = self.completion_tokens - tokens
        return ExampleBatch(batch_id=batch.batch_id, examples=examples, counts=counts,
                            timings=[*batch.timings, stage.timing])

    def stage(self, batch: bytes) -> bytes:
        """CritiqueBatch (with corrections) -> ExampleBatch, as msgpack."""
        return encode(self.validate_batch(decode(batch, CritiqueBatch)))


class Evaluator(_Role):
    """Scores critic versions on held-out arith items in direct mode (no reference), off the pipeline:
    the run's learning curve, on problems like the loop's (split ``arith``) and on longer ones
    (``arith-hard``). The held-out problems come from their own hash bucket, which no training example
    ever uses (DESIGN.md §6)."""

    def __init__(self, engine: Any, items: Sequence[Any], style: str = "compact",
                 sampling: SamplingParams | None = None, name: str = "evaluator") -> None:
        super().__init__(engine, name)
        self.heldout = list(items)
        self.style = style
        self.sampling = sampling or SamplingParams(max_new_tokens=512)

    def evaluate(self, version: int) -> dict[str, Any]:
        """EI-F1, CC-Acc and the rest (``scrit.evaluate``) of the critic at ``version`` or newer, on the
        ``arith`` split (top level) and ``arith-hard`` (under ``hard``): one engine call, so every item is
        critiqued by one version, which ``version`` in the result names (newer than asked only if the
        engine had moved on before the call)."""
        from scrit.evaluate import build_prompts, score_texts

        prompts = build_prompts(self.heldout, "direct", self.style)
        generations = self._generate(prompts, self.sampling, min_version=version)
        splits = score_texts(self.heldout, [g.text for g in generations], "direct")["splits"]
        hard = {"hard": splits["arith-hard"]} if "arith-hard" in splits else {}
        return {"version": generations[0].version, **splits.get("arith", {}), **hard}


def run_batch_locally(batch: ProblemBatch, solvers: Sequence[Solver], critic: Critic, corrector: Corrector,
                      validator: Validator) -> ExampleBatch:
    """One batch through every stage in this process, one stage after another: the synchronous
    reference for the streaming pipeline (same stage code, same seeds, so the same examples)."""
    critiqued = critic.critique_batch(batch, [solver.solve_batch(batch) for solver in solvers])
    return validator.validate_batch(corrector.correct_batch(critiqued))


def make_role(spec: RoleSpec, engine: Any) -> Solver | Critic | Corrector | Validator | Evaluator:
    """The role ``spec`` describes, generating through ``engine`` (None for a validator without a model)."""
    from scrit import factory
    from scrit.selfplay import get_domain

    domain = get_domain(spec.domain)
    settings = spec.settings
    if spec.kind == "solver":
        assert isinstance(settings, factory.SolverSettings)
        return Solver(engine, domain, spec.name, settings.samples_per_problem, spec.sampling, spec.style)
    if spec.kind == "critic":
        assert isinstance(settings, factory.CriticSettings)
        return Critic(engine, domain, spec.style, spec.sampling, settings, spec.name)
    if spec.kind == "corrector":
        assert isinstance(settings, factory.CorrectorSettings)
        return Corrector(engine, domain, spec.style, spec.sampling, settings.continue_critique, spec.name)
    if spec.kind == "validator":
        assert isinstance(settings, factory.ValidatorSettings)
        return Validator(engine, domain, spec.style, spec.sampling, settings.require_answer_match,
                         settings.require_verdict_match, spec.name, settings.rejudge_correct)
    if spec.kind == "evaluator":
        assert isinstance(settings, factory.EvaluatorSettings)
        from scrit.evaluate import build_arith_evalset, build_hard_evalset

        items = build_arith_evalset(n=settings.items, seed=settings.seed) if settings.items else []
        if settings.hard_items:
            items += build_hard_evalset(n=settings.hard_items, seed=settings.seed + 1)
        return Evaluator(engine, items, spec.style, spec.sampling, spec.name)
    raise ValueError(f"no role class for kind {spec.kind!r} (role {spec.name!r})")
