"""Prompts for every role and the one canonical critique format (DESIGN.md §4).

The canonical critique, sections in this order::

    Reference analysis: ...                     (contrastive mode only; never in training targets)
    Step 1: 12 + 5 = 17, expected 12 + 5 = 17: correct
    Step 2: 17 * 3 = 52, expected 17 * 3 = 51: wrong
    Conclusion: incorrect, first wrong step 2
    Correction:
    Step 2: 17 * 3 = 51
    Step 3: 51 - 4 = 47
    The answer is \\boxed{47}.

One line per student step up to the first wrong one (steps are numbered from 1 in text), each ending
in ``: correct`` or ``: wrong``; the part before the verdict is free text (the arith seed writes the
student's step and the step it expected). A correct solution ends with ``Conclusion: correct, no
wrong step``, ``Correction: none needed`` and its own answer boxed.
"""

from __future__ import annotations

import re

SOLVER_HEADER = "Solve the problem step by step."
CONTRASTIVE_HEADER = "Critique the student solution against the reference solution."
DIRECT_HEADER = "Critique the student solution."

# Real instruction-tuned LLMs need the format spelled out; the seed learned it from its corpus.
FORMAT_INSTRUCTIONS = (
    "Check the student's steps in order. Write one line per step, `Step k: <what you checked>: correct` "
    "or `: wrong`, and stop at the first wrong step. Then write `Conclusion: correct, no wrong step` or "
    "`Conclusion: incorrect, first wrong step k`. Then `Correction:` followed by the corrected steps "
    "from the first wrong step on (or `none needed`), ending with `The answer is \\boxed{answer}.`"
)
SOLVER_FORMAT_INSTRUCTIONS = (
    "Write one step per line as `Step k: ...` and end with `The answer is \\boxed{answer}.`"
)

# Instruct style only: a worked example and a closing instruction between the student solution and
# ``Critique:``. Without them a small instruction-tuned model (SmolLM2-135M-Instruct, the offline
# real-model path) answers the problem instead of writing the format: measured on 12 GSM8K critique
# prompts with its chat template, 0/12 critiques parsed with the instructions alone, 12/12 with this
# trailer (in a tiny `scrit run` about half parse; the content is poor, the format is there).
FORMAT_EXAMPLE = (
    "Example:\n"
    "Step 1: 3 + 4 = 7: correct\n"
    "Step 2: 7 * 2 = 16: wrong\n"
    "Conclusion: incorrect, first wrong step 2\n"
    "Correction:\n"
    "Step 2: 7 * 2 = 14\n"
    "The answer is \\boxed{14}."
)
CRITIQUE_REMINDER = "Now write your critique of the student solution in this format, starting with `Step 1:`."
INSTRUCT_CRITIQUE_TRAILER = f"{FORMAT_EXAMPLE}\n{CRITIQUE_REMINDER}\n"

CRITIQUE_START = "Critique:\n"
CORRECTION_MARKER = "Correction:"
CONCLUSION_CORRECT = "Conclusion: correct, no wrong step"


def resolve_prompt_style(model_spec: str, style: str = "auto") -> str:
    """'compact' for seed-family checkpoints (their corpus taught them the format), 'instruct' otherwise."""
    if style != "auto":
        return style
    if model_spec == "seed":
        return "compact"
    if model_spec.startswith(("http://", "https://")):
        return "instruct"
    from pathlib import Path

    return "compact" if (Path(model_spec) / "seed_info.json").is_file() else "instruct"


def use_chat_template(model_path: str, style: str) -> bool:
    """Whether a backend for ``model_path`` should wrap prompts in the model's chat template.

    True for the instruct style when the checkpoint directory ships a chat template
    (``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``): an instruction-tuned
    model prompted without its template mostly rambles (SmolLM2-135M-Instruct: 0 of 96 GSM8K critiques
    parsed). Never for the compact style (the seed family has no template and was trained on bare
    prompts) or for URLs (an OpenAI-compatible server applies its own template). The trainer must
    encode its prompts the same way (``run_training(chat_template=...)``).
    """
    if style != "instruct" or model_path.startswith(("http://", "https://")):
        return False
    import json
    from pathlib import Path

    directory = Path(model_path)
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template"))


def _header(base: str, instructions: str, style: str) -> str:
    if style == "compact":
        return base
    if style == "instruct":
        return f"{base} {instructions}"
    raise ValueError(f"unknown prompt style {style!r} (expected 'compact' or 'instruct')")


def solver_prompt(problem: str, style: str = "compact") -> str:
    return f"{_header(SOLVER_HEADER, SOLVER_FORMAT_INSTRUCTIONS, style)}\nProblem: {problem}\nSolution:\n"


def critic_prompt(problem: str, solution: str, reference: str | None = None, style: str = "compact") -> str:
    """Contrastive prompt when a reference is given, direct prompt otherwise.

    The instruct style adds :data:`INSTRUCT_CRITIQUE_TRAILER` (a worked example of the format and a
    closing instruction) right before ``Critique:``.
    """
    trailer = INSTRUCT_CRITIQUE_TRAILER if style == "instruct" else ""
    if reference is None:
        head = _header(DIRECT_HEADER, FORMAT_INSTRUCTIONS, style)
        return f"{head}\nProblem: {problem}\nStudent:\n{solution}\n{trailer}{CRITIQUE_START}"
    head = _header(CONTRASTIVE_HEADER, FORMAT_INSTRUCTIONS, style)
    return (f"{head}\nProblem: {problem}\nReference:\n{reference}\nStudent:\n{solution}\n"
            f"{trailer}{CRITIQUE_START}")


def critic_prompt_parts(prompt: str) -> tuple[str, str, str] | None:
    """``(problem, student solution, style)`` of a direct prompt written by :func:`critic_prompt`, or None
    for any other text (a contrastive prompt, a chat-formatted one): the trainer's rehearsal turns a
    right-answer student solution back into a solver example (``train.rehearsal_share``)."""
    for style in ("compact", "instruct"):
        head = f"{_header(DIRECT_HEADER, FORMAT_INSTRUCTIONS, style)}\nProblem: "
        tail = f"\n{INSTRUCT_CRITIQUE_TRAILER if style == 'instruct' else ''}{CRITIQUE_START}"
        if prompt.startswith(head) and prompt.endswith(tail) and "\nStudent:\n" in prompt:
            problem, solution = prompt[len(head):len(prompt) - len(tail)].split("\nStudent:\n", 1)
            return problem, solution, style
    return None


CORRECTOR_HEADER = "Correct the student solution using the critique."
CORRECTOR_INSTRUCTIONS = (
    "Write the corrected steps from the critique's first wrong step on, numbered as in the student "
    "solution, ending with `The answer is \\boxed{answer}.`; if the critique found no wrong step, write "
    "`none needed` and the student's answer boxed."
)


def corrector_prompt(problem: str, solution: str, critique: str, style: str = "compact") -> str:
    """Prompt for a separately configured corrector model (DESIGN.md §1 step 4).

    It ends in the critique's ``Correction:`` marker, so the corrector's output has exactly the shape
    of the critic continuing its own critique (the default), and ``critique + output`` is one canonical
    critique whatever produced the correction. No reference is shown: the corrector must work from
    the critique alone.
    """
    body = critique.rstrip()
    if body.endswith(CORRECTION_MARKER):
        body = body[: -len(CORRECTION_MARKER)].rstrip()
    head = _header(CORRECTOR_HEADER, CORRECTOR_INSTRUCTIONS, style)
    return f"{head}\nProblem: {problem}\nStudent:\n{solution}\n{CRITIQUE_START}{body}\n{CORRECTION_MARKER}"


VERDICT_SPAN = re.compile(r"(?<=: )(correct|wrong)$|(?<=^Conclusion: ).*$", re.MULTILINE)
# The Y of every "X op N = Y" the writer computes: all of a solution's, a critique's expected steps and
# correction; not the student's step a critique line quotes before ", expected".
COMPUTED_RESULT_SPAN = re.compile(r"(?<== )-?\d+(?!\d|, expected)")


WRONG_STEP_LINE = re.compile(r"^Step \d+:.*: wrong$", re.MULTILINE)


def target_loss_weights(target: str, *, verdict: float = 1.0, result: float = 1.0,
                        correction: float = 1.0, wrong_step: float = 1.0) -> list[float]:
    """A loss weight per character of a training target (a critique or a solution).

    Most of a critique is copied text; what decides the scores is a few characters: the verdict words
    (EI-F1) and the numbers the critic computes: each expected step's result (a critic that copies
    the student's result there calls a wrong step correct) and the correction's (CC-Acc). Every character
    after a ``Correction:`` line that opens a real correction (not ``none needed``) weighs
    ``correction``; every computed result ``Y`` of ``X op N = Y`` is multiplied by ``result``; the
    verdict words and the conclusion weigh ``verdict``. The results computed on the line the critique
    itself marks ``wrong`` are multiplied by ``wrong_step`` as well: on every other line the expected
    result equals the student's, so copying it is right there and almost all of the result loss
    rewards copying; the wrong line is the one place where only computing is right. All 1.0 is the
    plain per-token mean.
    """
    weights = [1.0] * len(target)
    marker = target.find(CORRECTION_MARKER + "\n")
    if marker >= 0 and correction != 1.0:
        for i in range(marker + len(CORRECTION_MARKER) + 1, len(target)):
            weights[i] = correction
    if result != 1.0:
        for match in COMPUTED_RESULT_SPAN.finditer(target):
            for i in range(match.start(), match.end()):
                weights[i] *= result
    if wrong_step != 1.0:
        for line in WRONG_STEP_LINE.finditer(target):
            for match in COMPUTED_RESULT_SPAN.finditer(target, line.start(), line.end()):
                for i in range(match.start(), match.end()):
                    weights[i] *= wrong_step
    if verdict != 1.0:
        for match in VERDICT_SPAN.finditer(target):
            for i in range(match.start(), match.end()):
                weights[i] = verdict
    return weights


def step_line(index: int, checked: str, correct: bool) -> str:
    """``Step k: <checked>: correct|wrong`` with k = index + 1."""
    return f"Step {index + 1}: {checked}: {'correct' if correct else 'wrong'}"


def conclusion_line(first_error_step: int) -> str:
    if first_error_step < 0:
        return CONCLUSION_CORRECT
    return f"Conclusion: incorrect, first wrong step {first_error_step + 1}"


def render_critique(
    step_checks: list[str],
    first_error_step: int,
    correction: str | None,
    answer: str,
    reference_analysis: str | None = None,
) -> str:
    """The canonical critique text.

    ``step_checks`` holds the free text checked for each step up to and including the first wrong one;
    ``correction`` is the corrected solution text from the first wrong step on (without the final
    answer line), ignored when the solution is correct.
    """
    lines = [f"Reference analysis: {reference_analysis}"] if reference_analysis else []
    last = len(step_checks) if first_error_step < 0 else first_error_step + 1
    for index in range(last):
        lines.append(step_line(index, step_checks[index], index != first_error_step))
    lines.append(conclusion_line(first_error_step))
    if first_error_step < 0:
        lines.append(f"{CORRECTION_MARKER} none needed")
    else:
        lines.append(CORRECTION_MARKER)
        if correction:
            lines.append(correction)
    lines.append(f"The answer is \\boxed{{{answer}}}.")
    return "\n".join(lines)


_REFERENCE_ANALYSIS = re.compile(r"^\s*[#*\s]*reference analysis\b", re.IGNORECASE)
_STEP_START = re.compile(r"^\s*[#*\s]*step\s*\d+", re.IGNORECASE)


def strip_reference_analysis(critique: str) -> str:
    """Drop the reference-analysis section (everything before the first step or conclusion line).

    Training targets must not mention a reference the trained critic will never see.
    """
    lines = critique.splitlines()
    if not lines or not _REFERENCE_ANALYSIS.match(lines[0]):
        return critique
    for i, line in enumerate(lines):
        if _STEP_START.match(line) or re.match(r"^\s*[#*\s]*conclusion", line, re.IGNORECASE):
            return "\n".join(lines[i:])
    return ""
