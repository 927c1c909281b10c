"""Supervised fine-tuning pieces shared by every training strategy (DESIGN.md §8). No Ray here.

A training example is ``prompt`` (problem + student solution) and ``target`` (step verdicts,
conclusion, correction). The model is trained to produce the target *given* the prompt, so the loss
covers the target tokens and the closing EOS only: the prompt is conditioning, not something the
critic should learn to write.

Tokenisation mirrors inference exactly, because a mismatch would teach the critic on inputs it never
sees: the prompt is tokenised on its own with the tokenizer's special tokens (the HF backend's
``tokenizer(prompt)``, e.g. a leading ``<s>``; or, with ``chat_template=True``, the same chat
wrapping the backend uses), the target on its own without special tokens, then EOS is appended so
the critic learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from scrit.messages import TrainingExample
from scrit.prompts import critic_prompt_parts, solver_prompt, target_loss_weights

__all__ = ["IGNORE_INDEX", "LossWeights", "encode_examples", "loss_denominator", "rehearsal_examples", "split_rows",
           "token_losses", "sft_loss"]


@dataclass(frozen=True)
class LossWeights:
    """Per-token loss weights on a critique target (``scrit.prompts.target_loss_weights``): the
    verdict words, the computed results, the correction, the results on the line marked wrong.
    All 1.0 = the plain mean."""

    verdict: float = 1.0
    result: float = 1.0
    correction: float = 1.0
    wrong_step: float = 1.0

    @classmethod
    def from_train_config(cls, train: Mapping[str, Any]) -> LossWeights:
        """The weights a ``train`` config section asks for (``train.*_weight``)."""
        return cls(float(train["verdict_weight"]), float(train["result_weight"]), float(train["correction_weight"]),
                   float(train["wrong_step_weight"]))

    @property
    def uniform(self) -> bool:
        return self.verdict == self.result == self.correction == self.wrong_step == 1.0


IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index
PAD_MULTIPLE = 64  # batch widths (and split_rows' row lengths) round up to this: few shapes for oneDNN's caches


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _prompt_ids(tokenizer: Any, prompt: str, chat_template: bool) -> list[int]:
    if chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def _leading_specials(ids: list[int], tokenizer: Any) -> int:
    """How many special tokens (e.g. ``<s>``) open the prompt; left truncation keeps them, since the
    model has always seen a sequence start with them."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def encode_examples(
    tokenizer: Any,
    examples: Sequence[TrainingExample],
    max_seq_len: int,
    *,
    chat_template: bool = False,
    pad_to_multiple_of: int = PAD_MULTIPLE,
    weights: LossWeights | None = None,
) -> dict[str, Any]:
    """Tokenise a batch for causal-LM SFT with the loss on target tokens only.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (LongTensors, shape ``(B, T)``, right
    padded: left padding buys nothing in training and right padding keeps position ids trivial) and
    ``num_skipped`` (int). ``labels`` is ``-100`` on every prompt token and every pad position.
    With ``weights`` that are not all 1 (and a fast tokenizer) it also returns ``loss_weights`` (float, same shape): each
    target token's weight (``scrit.prompts.target_loss_weights``, the largest over the token's
    characters), 1 for EOS, 0 elsewhere; ``sft_loss`` then takes the weighted mean.

    The width is rounded up to a multiple of ``pad_to_multiple_of`` (at most ``max_seq_len``): per-shape
    caches (oneDNN's primitives among them) then see a few widths, not one per batch. With a new width
    every step the trainer's memory grew ~9 MB per step for good (measured on the seed: 584 -> 857 MB
    over 30 steps; with widths rounded to 64, flat at 497 MB). Pads carry no loss and no attention.

    Truncation: a sequence longer than ``max_seq_len`` loses prompt tokens from the left, because
    the end of the prompt (the student's steps) is what the target comments on. Leading special
    tokens (``<s>``) are kept as long as one ordinary prompt token still fits beside them. The target is never cut: a cut target would teach the critic to stop mid-critique.
    An example whose target + EOS leaves no room for at least one prompt token (needed to predict
    the first target token) is skipped and counted in ``num_skipped``. If every example is skipped
    the tensors have shape ``(0, 0)``.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; the critic could not learn to stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    # Weights map characters to tokens through offsets, which only fast (Rust) tokenizers give.
    weighted = weights is not None and not weights.uniform and getattr(tokenizer, "is_fast", False)
    rows: list[tuple[list[int], int]] = []  # (ids, number of prompt tokens)
    row_weights: list[list[float]] = []  # per target token (EOS included), when weighted
    skipped = 0
    for example in examples:
        prompt = _prompt_ids(tokenizer, example.prompt, chat_template)
        if weighted:
            target, target_weights = _weighted_target(tokenizer, example.target, weights)
        else:
            target = list(tokenizer(example.target, add_special_tokens=False)["input_ids"])
        target.append(eos)
        room = max_seq_len - len(target)  # tokens left for the prompt
        if room < 1 or not prompt:
            skipped += 1
            continue
        if len(prompt) > room:
            head = min(_leading_specials(prompt, tokenizer), room - 1)
            tail = room - head
            prompt = prompt[:head] + prompt[len(prompt) - tail :]
        rows.append((prompt + target, len(prompt)))
        if weighted:
            row_weights.append(target_weights + [1.0])

    width = max((len(ids) for ids, _ in rows), default=0)
    if width and pad_to_multiple_of > 1:
        width = min(max(max_seq_len, width), _round_up(width, pad_to_multiple_of))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(rows):
        values = torch.tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = values
        attention_mask[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = values[n_prompt:]
    encoded = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_skipped": skipped}
    if weighted:
        loss_weights = torch.zeros((len(rows), width), dtype=torch.float32)
        for row, ((ids, n_prompt), target_weights) in enumerate(zip(rows, row_weights)):
            loss_weights[row, n_prompt : len(ids)] = torch.tensor(target_weights)
        encoded["loss_weights"] = loss_weights
    return encoded


def rehearsal_examples(examples: Sequence[TrainingExample], share: float) -> list[TrainingExample]:
    """Solver examples to train beside a batch of critiques: ``round(share * len(examples))`` of the
    batch's right-answer student solutions, each as the answer to its problem's solver prompt.

    Critique training alone wears away the arithmetic the critic's expected steps and corrections need
    (measured: 96 % of solution steps right in the seed, 74 % after a default run without rehearsal,
    87-89 % with it; ``benchmarks/offline_levers.py --probes-only``, docs/learning.md). A right-answer
    solution is exactly the supervision the loop may use (DESIGN.md §1: final answers and correct
    solutions), so rehearsing it is honest.
    """
    wanted = round(share * len(examples))
    rehearsal: list[TrainingExample] = []
    for example in examples:
        if len(rehearsal) >= wanted:
            break
        parts = critic_prompt_parts(example.prompt) if example.student_correct else None
        if parts is None:
            continue
        problem, solution, style = parts
        rehearsal.append(TrainingExample(
            prompt=solver_prompt(problem, style), target=solution, student_correct=True,
            problem_id=example.problem_id, version=example.version, solver=example.solver,
            batch_id=example.batch_id))
    return rehearsal


def _weighted_target(tokenizer: Any, target: str, weights: LossWeights) -> tuple[list[int], list[float]]:
    """The target's token ids and a weight per token: the largest character weight in its span."""
    encoded = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    chars = target_loss_weights(target, verdict=weights.verdict, result=weights.result,
                                correction=weights.correction, wrong_step=weights.wrong_step)
    token_weights = [max(chars[start:end], default=1.0) for start, end in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), token_weights


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy, shape ``(B, T)``: entry ``t`` is the loss of predicting
    ``labels[:, t]`` from the logits at ``t - 1`` (so column 0 is always 0), and 0 where the label is
    ``-100``. Computed in float32 so bf16 autocast does not round the loss itself."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return F.pad(losses, (1, 0))


def loss_denominator(batch: dict[str, Any]) -> float:
    """What ``sft_loss`` divides a batch's summed token losses by: the total weight of its target tokens
    (``loss_weights``), or their number. Computed once for a whole micro-batch, it lets the micro-batch
    run in pieces (``split_rows``) whose losses add up to the micro-batch's own."""
    labels = batch["labels"]
    if "loss_weights" in batch:
        return float(batch["loss_weights"][:, 1:].sum())
    return float((labels[:, 1:] != IGNORE_INDEX).sum())


def split_rows(batch: dict[str, Any], pad_to_multiple_of: int = PAD_MULTIPLE) -> list[dict[str, Any]]:
    """The rows of an encoded batch as batches of one, each cut to its own length rounded up to
    ``pad_to_multiple_of`` (the few widths ``encode_examples`` also keeps to).

    On a CPU a pad position costs as much as a real token, and a micro-batch's rows differ a lot in
    length (a rehearsal row, a bare solution, is a fraction of a critique): one row at a time skips
    most of the padding, 1.47x the tokens/s of the padded batch on one core here
    (``benchmarks/trainer.py``). Right padding makes the cut exact: a row's real tokens never attend
    to its pads, so its logits, and with ``loss_denominator`` its loss, are the padded batch's.
    """
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    width = int(batch["input_ids"].shape[1])
    pieces = []
    for row, length in enumerate(lengths):
        cut = min(width, _round_up(int(length), pad_to_multiple_of))
        pieces.append({key: value[row:row + 1, :cut] for key, value in batch.items() if isinstance(value, torch.Tensor)})
    return pieces


def sft_loss(model: Any, batch: dict[str, Any], denominator: float | None = None) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the target tokens of ``batch`` and how many target tokens there were.

    The mean is per token (not per example), so a long critique weighs in proportion to its length,
    the usual SFT convention; with ``loss_weights`` in the batch it is the weighted mean (the same
    scale, the weight moved onto the tokens that carry it). ``denominator`` (``loss_denominator`` of a
    whole micro-batch) replaces the batch's own when ``batch`` is one piece of it (``split_rows``).
    ``model`` may be wrapped (DDP, DeepSpeed engine): it is only called.
    """
    labels = batch["labels"]
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    losses = token_losses(outputs.logits, labels.to(outputs.logits.device))
    n_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum().item())
    if denominator is None:
        denominator = loss_denominator(batch)
    if n_tokens == 0 or denominator <= 0:  # keeps the graph (and any collective in backward) alive with a zero loss
        return outputs.logits.sum() * 0.0, 0
    if "loss_weights" in batch:
        weights = batch["loss_weights"].to(losses.device)
        return (losses * weights).sum() / denominator, n_tokens
    return losses.sum() / denominator, n_tokens
