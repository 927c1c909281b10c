"""The self-play roles as plain classes: solver, critic, corrector, validator (DESIGN.md §1).

Each role owns an ``InferenceBackend`` and, optionally, ``follow``: a callable returning the
registry's latest ``WeightVersion``. ``maybe_swap()`` runs before every batch, so a role picks up a
newly published critic between batches and never in the middle of one; every output message records
the ``backend.version`` that produced it. The Ray shells in ``actors/shells.py`` only build a backend
and a ``follow`` and forward calls here, so all of this runs and is tested without Ray.

Integrity rule: the roles see problems, solutions, references (correct solutions) and the final
answer (the validator's optional answer check), never step labels or programmatic critiques.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from scrit import telemetry
from scrit.backends.base import Generation, InferenceBackend, SamplingParams
from scrit.domains.base import Domain
from scrit.messages import Correction, Critique, CritiqueRequest, Problem, Solution, Validation, WeightVersion
from scrit.prompts import CORRECTION_MARKER, critic_prompt, corrector_prompt, solver_prompt
from scrit.selfplay import critique_from_text, label_solution

__all__ = [
    "CorrectorRole",
    "CriticRole",
    "Follow",
    "SOLUTION_END_STOPS",
    "SolverRole",
    "ValidatorRole",
    "request_prompt",
]

log = logging.getLogger(__name__)

Follow = Callable[[], "WeightVersion | None"]

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


def _verify(version: WeightVersion) -> bool:
    """True unless ``version.uri`` is a local checkpoint whose checksum differs from the published one.

    Guards subscribers against loading a checkpoint that is still being written or was overwritten.
    A URI that is not a local directory (an HTTP backend's server owns its weights) is not checked.
    """
    if not version.checksum or not Path(version.uri).is_dir():
        return True
    from scrit.actors.registry import checkpoint_checksum

    try:
        return checkpoint_checksum(version.uri) == version.checksum
    except OSError:
        return False


class _Role:
    """Backend + hot-swap bookkeeping shared by all roles."""

    def __init__(self, backend: InferenceBackend, follow: Follow | None = None, verify_checksum: bool = True) -> None:
        self.backend = backend
        self.follow = follow
        self.verify_checksum = verify_checksum
        self._swap_lock = threading.Lock()
        self.swap_latencies: deque[float] = deque(maxlen=100)  # seconds per completed swap, newest last
        self.swaps = 0
        self.swap_errors = 0
        self.items = 0
        self.batches = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def version(self) -> int:
        return self.backend.version

    def maybe_swap(self) -> bool:
        """Load the registry's latest version if it is newer than the backend's; True if swapped.

        Called between batches only. A swap that fails (unreadable or mismatching checkpoint) is
        logged and counted, and the role keeps serving its current version: a bad checkpoint must
        not stop data generation.
        """
        if self.follow is None:
            return False
        latest = self.follow()
        if latest is None or latest.version <= self.backend.version:
            return False
        with self._swap_lock:
            if latest.version <= self.backend.version:  # another thread swapped meanwhile
                return False
            start = time.perf_counter()
            try:
                if self.verify_checksum and not _verify(latest):
                    raise ValueError(f"checksum mismatch for {latest.uri!r}")
                self.backend.load_weights(latest.version, latest.uri)
            except Exception as error:  # noqa: BLE001 - keep serving the current version
                self.swap_errors += 1
                telemetry.count_swap_error(telemetry.role_of(self))
                log.error("could not load critic version %d from %s: %s", latest.version, latest.uri, error)
                return False
            self.swap_latencies.append(time.perf_counter() - start)
            self.swaps += 1
            telemetry.observe_swap(telemetry.role_of(self), latest)
        log.info("%s now on version %d (%.2fs)", type(self).__name__, latest.version, self.swap_latencies[-1])
        return True

    def _generate(self, prompts: Sequence[str], sampling: SamplingParams) -> list[Generation]:
        started = time.perf_counter()
        generations = self.backend.generate(prompts, sampling) if prompts else []
        telemetry.record_generation(telemetry.role_of(self), generations, time.perf_counter() - started)
        self.batches += 1
        self.items += len(generations)
        self.prompt_tokens += sum(g.prompt_tokens for g in generations)
        self.completion_tokens += sum(g.completion_tokens for g in generations)
        return generations

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: items, tokens, version, swaps and swap latency."""
        return {
            "role": type(self).__name__,
            "version": self.backend.version,
            "items": self.items,
            "batches": self.batches,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "swaps": self.swaps,
            "swap_errors": self.swap_errors,
            "last_swap_s": self.swap_latencies[-1] if self.swap_latencies else None,
        }


class SolverRole(_Role):
    """Samples ``samples_per_problem`` step-by-step solutions per problem and labels them by answer."""

    def __init__(
        self,
        backend: InferenceBackend,
        domain: Domain,
        name: str = "solver",
        samples_per_problem: int = 4,
        sampling: SamplingParams | None = None,
        style: str = "compact",
        follow: Follow | None = None,
    ) -> None:
        super().__init__(backend, follow)
        if samples_per_problem < 1:
            raise ValueError(f"samples_per_problem must be >= 1, got {samples_per_problem}")
        self.domain = domain
        self.name = name
        self.samples_per_problem = samples_per_problem
        self.sampling = _with_stops(sampling or SamplingParams(temperature=1.0, max_new_tokens=256),
                                    SOLUTION_END_STOPS)
        self.style = style
        self._calls = 0

    def solve(self, problems: Sequence[Problem]) -> list[Solution]:
        """``samples_per_problem`` Solutions per problem, grouped by problem in input order.

        With a fixed ``sampling.seed`` each call uses ``seed + call number``: repeating the seed would
        give every round the same samples.
        """
        self.maybe_swap()
        sampling = self.sampling
        if sampling.seed is not None:
            sampling = msgspec.structs.replace(sampling, seed=sampling.seed + self._calls)
        self._calls += 1
        prompts = [solver_prompt(p.question, self.style) for p in problems for _ in range(self.samples_per_problem)]
        generations = self._generate(prompts, sampling)
        owners = [p for p in problems for _ in range(self.samples_per_problem)]
        return [
            label_solution(self.domain, problem, _strip_stops(gen.text, SOLUTION_END_STOPS).strip(), self.name,
                           gen.version)
            for problem, gen in zip(owners, generations)
        ]


def request_prompt(request: CritiqueRequest, style: str) -> str:
    """The critic prompt for a request: contrastive with its reference, direct without one."""
    reference = request.reference.text if request.reference is not None else None
    return critic_prompt(request.problem.question, request.solution.text, reference, style)


class CriticRole(_Role):
    """Writes the critique up to and including ``Correction:`` (the correction is the corrector's)."""

    def __init__(
        self,
        backend: InferenceBackend,
        domain: Domain,
        style: str = "compact",
        sampling: SamplingParams | None = None,
        follow: Follow | None = None,
    ) -> None:
        super().__init__(backend, follow)
        self.domain = domain
        self.style = style
        self.sampling = _with_stops(sampling or SamplingParams(max_new_tokens=512), (CORRECTION_MARKER,))

    def critique(self, requests: Sequence[CritiqueRequest]) -> list[Critique]:
        """One Critique per request, in order; unparseable output gives ``parsed=False``, not an error."""
        self.maybe_swap()
        generations = self._generate([request_prompt(r, self.style) for r in requests], self.sampling)
        return [critique_from_text(r.problem.id, r.mode, gen.text, gen.version) for r, gen in zip(requests, generations)]


def _reached_correction(critique: Critique) -> bool:
    return critique.parsed and critique.raw_text.rstrip().endswith(CORRECTION_MARKER)


class CorrectorRole(_Role):
    """Writes the correction that completes a critique.

    ``continue_critique=True`` (default, as in the paper): ``backend`` is the critic's own backend and
    the model simply continues its critique, prompt = critic prompt + critique text (ending in
    ``Correction:``), until EOS. ``continue_critique=False``: ``backend`` is a separately configured
    corrector model prompted with ``corrector_prompt``. Either way the full critique is
    ``critique.raw_text + correction.text`` (``scrit.selfplay.complete_critique``).

    A critique that is unparseable or never reached ``Correction:`` gets an empty Correction without
    any generation: it would fail validation whatever followed.

    In continuation mode ``follow`` should stay None: the critic role owns the swaps, and swapping
    between a critique and its continuation would mix two versions in one critique.
    """

    def __init__(
        self,
        backend: InferenceBackend,
        domain: Domain,
        style: str = "compact",
        sampling: SamplingParams | None = None,
        continue_critique: bool = True,
        follow: Follow | None = None,
    ) -> None:
        super().__init__(backend, follow)
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
        self.maybe_swap()
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


class ValidatorRole(_Role):
    """Judges corrected solutions with a direct critique (no reference) by the evolving critic.

    Passed iff the critique parses and says "correct, no wrong step", and, with
    ``require_answer_match``, the corrected solution's final answer equals the problem's answer.
    Only the judgment is needed, so generation stops at ``Correction:``.
    """

    def __init__(
        self,
        backend: InferenceBackend,
        domain: Domain,
        style: str = "compact",
        sampling: SamplingParams | None = None,
        require_answer_match: bool = True,
        follow: Follow | None = None,
    ) -> None:
        super().__init__(backend, follow)
        self.domain = domain
        self.style = style
        self.require_answer_match = require_answer_match
        self.sampling = _with_stops(sampling or SamplingParams(max_new_tokens=512), (CORRECTION_MARKER,))

    def validate(self, problems: Sequence[Problem], corrected_texts: Sequence[str]) -> list[Validation]:
        """One Validation per (problem, corrected solution text), in order."""
        if len(problems) != len(corrected_texts):
            raise ValueError(f"{len(problems)} problems but {len(corrected_texts)} corrected solutions")
        self.maybe_swap()
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

