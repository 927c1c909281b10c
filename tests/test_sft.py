"""SFT encoding and loss: the loss covers target tokens (and EOS) only, truncation never cuts the target."""

from __future__ import annotations

import math

import pytest
import torch

from scrit.messages import TrainingExample
from scrit.seed.tokenizer import build_char_tokenizer
from scrit.train.sft import IGNORE_INDEX, encode_examples, sft_loss, token_losses

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, initializer_range=0.5, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return Qwen2ForCausalLM(config).eval()


def ex(prompt: str, target: str, correct: bool = True) -> TrainingExample:
    return TrainingExample(prompt=prompt, target=target, student_correct=correct, problem_id="p", version=0)


def ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_layout_labels_and_right_padding(tok) -> None:
    batch = encode_examples(tok, [ex("Q: 1+1", "ok"), ex("Q", "Step 1: right")], max_seq_len=64, pad_to_multiple_of=1)
    assert batch["num_skipped"] == 0
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    first = [bos] + ids(tok, "Q: 1+1") + ids(tok, "ok") + [eos]
    second = [bos] + ids(tok, "Q") + ids(tok, "Step 1: right") + [eos]
    width = max(len(first), len(second))
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0].tolist() == first + [pad] * (width - len(first))  # right padding
    assert batch["input_ids"][1].tolist() == second
    assert batch["attention_mask"][0].tolist() == [1] * len(first) + [0] * (width - len(first))
    n_prompt = 1 + len("Q: 1+1")
    expected = [IGNORE_INDEX] * n_prompt + first[n_prompt:] + [IGNORE_INDEX] * (width - len(first))
    assert batch["labels"][0].tolist() == expected  # prompt and padding ignored; target and EOS learned
    assert batch["labels"][0].tolist()[len(first) - 1] == eos


def test_truncation_cuts_prompt_from_left_keeps_bos_and_whole_target(tok) -> None:
    prompt, target = "abcdefghij", "XYZ"
    full = 1 + len(prompt) + len(target) + 1
    batch = encode_examples(tok, [ex(prompt, target)], max_seq_len=full - 4)
    row = batch["input_ids"][0].tolist()
    assert len(row) == full - 4
    assert row[0] == tok.bos_token_id  # the sequence still starts the way it always does
    assert row[1:] == ids(tok, "efghij") + ids(tok, target) + [tok.eos_token_id]  # tail of the prompt kept
    labels = batch["labels"][0].tolist()
    assert labels[: 1 + 6] == [IGNORE_INDEX] * 7
    assert labels[7:] == ids(tok, target) + [tok.eos_token_id]


def test_too_long_targets_are_skipped_and_counted(tok) -> None:
    target = "T" * 10  # 11 tokens with EOS
    examples = [ex("p", target), ex("p", "short"), ex("prompt", "T" * 11)]
    batch = encode_examples(tok, examples, max_seq_len=12)  # room for exactly one prompt token
    assert batch["num_skipped"] == 1  # target + EOS = 12 leaves no prompt token to condition on
    assert batch["input_ids"].shape[0] == 2
    first = batch["input_ids"][0].tolist()
    assert first == ids(tok, "p" + target) + [tok.eos_token_id]  # the last prompt token beats <s>
    everything = encode_examples(tok, [ex("p", "T" * 20)], max_seq_len=12)
    assert everything["num_skipped"] == 1 and everything["input_ids"].shape == (0, 0)
    with pytest.raises(ValueError):
        encode_examples(tok, examples, max_seq_len=1)


def test_chat_template_wraps_the_prompt_like_the_backend(tok) -> None:
    chat_tok = build_char_tokenizer()
    chat_tok.chat_template = "{% for m in messages %}U:{{ m['content'] }}\n{% endfor %}C:"
    batch = encode_examples(chat_tok, [ex("hi", "ok")], max_seq_len=64, chat_template=True, pad_to_multiple_of=1)
    assert batch["input_ids"][0].tolist() == ids(tok, "U:hi\nC:") + ids(tok, "ok") + [tok.eos_token_id]
    assert batch["labels"][0].tolist()[: len("U:hi\nC:")] == [IGNORE_INDEX] * len("U:hi\nC:")


def test_loss_is_mean_cross_entropy_over_target_tokens_by_hand(tok, model) -> None:
    batch = encode_examples(tok, [ex("Start with 3. Add 4.", "Step 1: correct")], max_seq_len=128, pad_to_multiple_of=1)
    with torch.no_grad():
        loss, n = sft_loss(model, batch)
        logits = model(input_ids=batch["input_ids"]).logits[0]
    row = batch["input_ids"][0].tolist()
    n_prompt = 1 + len("Start with 3. Add 4.")
    assert n == len(row) - n_prompt == len("Step 1: correct") + 1
    by_hand = [-torch.log_softmax(logits[t - 1].double(), -1)[row[t]].item() for t in range(n_prompt, len(row))]
    assert loss.item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)


def test_prompt_positions_contribute_no_loss_and_no_gradient(tok) -> None:
    batch = encode_examples(tok, [ex("some prompt", "target!")], max_seq_len=64, pad_to_multiple_of=1)
    labels = batch["labels"]
    logits = torch.randn(1, labels.shape[1], len(tok), requires_grad=True)
    losses = token_losses(logits, labels)
    n_prompt = 1 + len("some prompt")
    assert torch.all(losses[0, :n_prompt] == 0) and torch.all(losses[0, n_prompt:] > 0)
    losses.sum().backward()
    # Logits at position t predict token t+1: positions before the last prompt token get no gradient.
    assert torch.all(logits.grad[0, : n_prompt - 1] == 0)
    assert torch.all(logits.grad[0, n_prompt - 1 : -1].abs().sum(-1) > 0)
    assert torch.all(logits.grad[0, -1] == 0)  # nothing follows EOS

    # Arbitrary label values on prompt positions cannot leak in once masked: same loss either way.
    scrambled = labels.clone()
    scrambled[0, :n_prompt] = IGNORE_INDEX
    assert torch.equal(token_losses(logits, scrambled), losses)


def test_padding_and_batch_mates_do_not_change_an_examples_loss(tok, model) -> None:
    examples = [ex("Start with 3.", "Step 1: correct"), ex("Start with 12. Multiply by 9.", "ok"),
                ex("x", "Conclusion: wrong")]
    with torch.no_grad():
        total, n_total = sft_loss(model, encode_examples(tok, examples, max_seq_len=128))
        parts = [sft_loss(model, encode_examples(tok, [e], max_seq_len=128)) for e in examples]
    assert n_total == sum(n for _, n in parts)
    weighted = sum(loss.item() * n for loss, n in parts) / n_total
    assert total.item() == pytest.approx(weighted, rel=1e-5)


def test_different_prompt_same_target_counts_the_same_tokens(tok, model) -> None:
    a = encode_examples(tok, [ex("short", "Step 1: wrong")], max_seq_len=128)
    b = encode_examples(tok, [ex("a much longer prompt text", "Step 1: wrong")], max_seq_len=128)
    with torch.no_grad():
        (la, na), (lb, nb) = sft_loss(model, a), sft_loss(model, b)
    assert na == nb == len("Step 1: wrong") + 1
    assert math.isfinite(la.item()) and math.isfinite(lb.item())


def test_width_is_rounded_to_a_few_shapes_and_padding_changes_no_loss(tok, model) -> None:
    """Widths round up to a multiple of 64 (capped at max_seq_len) so per-shape caches stay small; the
    pads carry no label and no attention, so the loss is the same as unpadded."""
    examples = [ex("Start with 3. Add 4.", "Step 1: correct"), ex("Start with 5.", "Step 1: 5 + 1 = 6: wrong")]
    tight = encode_examples(tok, examples, max_seq_len=128, pad_to_multiple_of=1)
    rounded = encode_examples(tok, examples, max_seq_len=128)
    assert tight["input_ids"].shape[1] % 64 != 0 and rounded["input_ids"].shape[1] == 64
    assert encode_examples(tok, examples, max_seq_len=40)["input_ids"].shape[1] <= 40
    with torch.no_grad():
        assert torch.allclose(sft_loss(model, tight)[0], sft_loss(model, rounded)[0], atol=1e-5)


CRITIQUE = (
    "Step 1: 3 + 4 = 7, expected 3 + 4 = 7: correct\n"
    "Step 2: 7 * 2 = 16, expected 7 * 2 = 14: wrong\n"
    "Conclusion: incorrect, first wrong step 2\n"
    "Correction:\n"
    "Step 2: 7 * 2 = 14\n"
    "The answer is \\boxed{14}."
)


def test_target_loss_weights_mark_verdicts_results_and_the_correction() -> None:
    from scrit.prompts import target_loss_weights

    weights = target_loss_weights(CRITIQUE, verdict=4.0, result=2.0, correction=3.0)
    marked = {CRITIQUE[i] if w != 1.0 else "_" for i, w in enumerate(weights)}
    assert len(weights) == len(CRITIQUE) and marked != {"_"}
    start = CRITIQUE.index("Correction:\n") + len("Correction:\n")
    assert set(weights[start:]) == {3.0, 6.0}  # the whole correction; its computed result 14 x 2
    assert weights[CRITIQUE.index("= 14\nThe") + 2] == 6.0
    wrong = CRITIQUE.index("wrong")
    assert weights[wrong:wrong + 5] == [4.0] * 5
    conclusion = CRITIQUE.index("incorrect, first")
    assert weights[conclusion] == 4.0 and weights[CRITIQUE.index("Conclusion")] == 1.0
    assert weights[CRITIQUE.index("= 14: wrong") + 2] == 2.0  # the expected step's result: computed
    assert weights[CRITIQUE.index("= 16") + 2] == 1.0  # the student's result, quoted
    assert weights[CRITIQUE.index("Step 1")] == 1.0
    none_needed = "Step 1: 3 + 4 = 7: correct\nConclusion: correct, no wrong step\nCorrection: none needed\n"
    assert max(target_loss_weights(none_needed, correction=3.0)) == 1.0  # nothing to correct
    assert target_loss_weights(CRITIQUE) == [1.0] * len(CRITIQUE)


def test_wrong_step_weight_marks_only_what_the_wrong_line_computes() -> None:
    """The expected result on the line the critique marks wrong is where copying the student's result
    fails; no other result (the correct line's, the student's quoted 16, the correction's) gets it."""
    from scrit.prompts import target_loss_weights
    from scrit.train.sft import LossWeights

    weights = target_loss_weights(CRITIQUE, result=3.0, wrong_step=2.0)
    expected_14 = CRITIQUE.index("= 14: wrong") + 2
    assert weights[expected_14:expected_14 + 2] == [6.0, 6.0]
    assert weights[CRITIQUE.index("= 7: correct") + 2] == 3.0  # computed, but on a correct line
    assert weights[CRITIQUE.index("= 16") + 2] == 1.0  # the student's result, quoted
    assert weights[CRITIQUE.index("= 14\nThe") + 2] == 3.0  # the correction's result
    assert [i for i, w in enumerate(weights) if w == 6.0] == [expected_14, expected_14 + 1]
    correct = "Step 1: 3 + 4 = 7, expected 3 + 4 = 7: correct\nConclusion: correct, no wrong step\n"
    assert target_loss_weights(correct, wrong_step=5.0) == [1.0] * len(correct)  # no line marked wrong
    train = {"verdict_weight": 1.0, "result_weight": 3.0, "correction_weight": 1.0, "wrong_step_weight": 1.5}
    assert LossWeights.from_train_config(train) == LossWeights(1.0, 3.0, 1.0, 1.5)
    assert not LossWeights(wrong_step=1.5).uniform and LossWeights().uniform


def test_rehearsal_turns_right_answer_solutions_into_solver_examples() -> None:
    """Only right-answer student solutions become solver examples (the loop's only supervision is the
    final answer), as many as the share asks, in the prompt style the critique was written in."""
    from scrit.prompts import critic_prompt, solver_prompt
    from scrit.train.sft import rehearsal_examples

    problem = "Start with 3. Add 4. What is the result?"
    right, wrong = "Step 1: 3 + 4 = 7\nThe answer is \\boxed{7}.", "Step 1: 3 + 4 = 8\nThe answer is \\boxed{8}."
    batch = [ex(critic_prompt(problem, wrong), "Step 1: ...: wrong", correct=False),
             ex(critic_prompt(problem, right), "Step 1: ...: correct"),
             ex(critic_prompt(problem, right, style="instruct"), "Step 1: ...: correct"),
             ex(critic_prompt(problem, right, reference=right), "a contrastive prompt is never a training prompt")]
    assert rehearsal_examples(batch, 0.0) == []
    one = rehearsal_examples(batch, 0.25)
    assert [(r.prompt, r.target, r.student_correct) for r in one] == [(solver_prompt(problem), right, True)]
    both = rehearsal_examples(batch, 1.0)  # asks for 4; only two right-answer direct prompts exist
    assert [r.prompt for r in both] == [solver_prompt(problem), solver_prompt(problem, "instruct")]
    assert all(r.target == right for r in both)


def test_weighted_loss_puts_each_tokens_weight_on_its_own_loss(tok, model) -> None:
    from scrit.prompts import target_loss_weights
    from scrit.train.sft import LossWeights

    examples = [ex("Q: 7*2", CRITIQUE, correct=False), ex("Q", "Step 1: 3 + 4 = 7: correct")]
    plain = encode_examples(tok, examples, max_seq_len=512)
    assert "loss_weights" not in plain and "loss_weights" not in encode_examples(
        tok, examples, max_seq_len=512, weights=LossWeights())
    weighted = encode_examples(tok, examples, max_seq_len=512, weights=LossWeights(4.0, 2.0, 3.0))
    w = weighted["loss_weights"]
    assert torch.equal(weighted["input_ids"], plain["input_ids"]) and w.shape == plain["labels"].shape
    assert torch.equal(w > 0, plain["labels"] != IGNORE_INDEX)  # target tokens and EOS only
    n_prompt = 1 + len("Q: 7*2")
    assert w[0, n_prompt:n_prompt + len(CRITIQUE)].tolist() == pytest.approx(
        target_loss_weights(CRITIQUE, verdict=4.0, result=2.0, correction=3.0))
    assert w[0, n_prompt + len(CRITIQUE)] == 1.0  # EOS
    with torch.no_grad():
        loss, n_tokens = sft_loss(model, weighted)
        losses = token_losses(model(input_ids=plain["input_ids"]).logits, plain["labels"])
        plain_loss, _ = sft_loss(model, plain)
    assert n_tokens == int((plain["labels"] != IGNORE_INDEX).sum())
    assert loss.item() == pytest.approx(((losses * w).sum() / w.sum()).item(), rel=1e-5)
    assert abs(loss.item() - plain_loss.item()) > 1e-4  # the weights moved the loss
    doubled = dict(plain, loss_weights=(plain["labels"] != IGNORE_INDEX).float() * 2.0)
    with torch.no_grad():
        assert sft_loss(model, doubled)[0].item() == pytest.approx(plain_loss.item(), rel=1e-5)  # same scale


@pytest.mark.parametrize("weighted", [False, True])
def test_split_rows_give_the_padded_batchs_loss_and_gradient(tok, model, weighted: bool) -> None:
    """The trainer's CPU path runs a micro-batch one row at a time, each row cut to its own length:
    with the whole batch's denominator the pieces' losses add up to the padded batch's loss, and their
    gradients to its gradient, while the pieces carry far fewer pad positions."""
    from scrit.train.sft import LossWeights, loss_denominator, split_rows

    examples = [ex("Q: 7*2", CRITIQUE, correct=False), ex("Q", "Step 1: 3 + 4 = 7: correct"), ex("x", "ok")]
    batch = encode_examples(tok, examples, max_seq_len=512, pad_to_multiple_of=8,
                            weights=LossWeights(4.0, 2.0, 3.0) if weighted else None)
    assert ("loss_weights" in batch) is weighted
    pieces = split_rows(batch, pad_to_multiple_of=8)
    assert [p["input_ids"].shape for p in pieces] == [
        (1, -(-int(n) // 8) * 8) for n in batch["attention_mask"].sum(dim=1)]
    assert sum(p["input_ids"].numel() for p in pieces) < batch["input_ids"].numel()  # the pads left out

    def gradient(parts: list[dict], denominator: float | None) -> tuple[float, int, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        total, n_total = 0.0, 0
        for part in parts:
            loss, n = sft_loss(model, part, denominator)
            loss.backward()
            total, n_total = total + loss.item(), n_total + n
        return total, n_total, [p.grad.clone() for p in model.parameters()]

    whole_loss, whole_n, whole_grad = gradient([batch], None)
    split_loss, split_n, split_grad = gradient(pieces, loss_denominator(batch))
    model.zero_grad(set_to_none=True)
    assert split_n == whole_n and split_loss == pytest.approx(whole_loss, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(whole_grad, split_grad))
    # Without the batch's denominator each piece would be its own mean: a different loss.
    own_means = sum(sft_loss(model, p)[0].item() for p in pieces)
    assert own_means != pytest.approx(whole_loss, rel=1e-3)
