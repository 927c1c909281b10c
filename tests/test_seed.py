"""The seed model's pieces: tokenizer, corpus mix, the two-phase builder, and the shipped checkpoint."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace

import pytest
import torch

from scrit.seed import SEED_MODEL_DIR, model_dir
from scrit.domains.arith import arith_split
from scrit.seed.corpus import CARELESS_MIX, DEFAULT_MIX, PHASE2_MIX, PHASE3_MIX, sample_example
from scrit.seed.tokenizer import build_char_tokenizer
from scrit.seed.train import (
    SeedRecipe,
    build_seed,
    careless_recipe,
    encode_example,
    phase2_recipe,
    phase3_recipe,
    weighted_lm_loss,
)

TEXT = "Step 1: 12 + 5 = 17\nThe answer is \\boxed{47}."


def test_char_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from scrit.backends.hf import load_tokenizer

    tokenizer = build_char_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(TEXT) + 1  # one token per character
    tokenizer.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded.decode(loaded(TEXT)["input_ids"], skip_special_tokens=True) == TEXT
        assert loaded.padding_side == "left"


def test_corpus_mix_and_heldout_exclusion():
    rng = random.Random(3)
    examples = [sample_example(rng) for _ in range(3000)]
    kinds = Counter(e.kind for e in examples)
    assert abs(kinds["direct"] / len(examples) - DEFAULT_MIX["direct"]) < 0.02
    assert kinds["direct"] < kinds["contrastive"] / 5  # direct critiques stay a small minority
    # No training example is about a held-out problem.
    for example in examples:
        problem_line = next(line for line in example.prompt.splitlines() if line.startswith("Problem: "))
        assert arith_split(problem_line[len("Problem: "):]) == "train"
    phase2 = Counter(sample_example(rng, PHASE2_MIX).kind for _ in range(2000))
    assert phase2["drill"] > 0 and phase2["direct"] < phase2["contrastive"]


def test_loss_weights_cover_targets_verdicts_and_results():
    tokenizer = build_char_tokenizer()
    char_ids = {t: i for t, i in tokenizer.get_vocab().items() if len(t) == 1}
    example = sample_example(random.Random(11), {"contrastive": 1.0})
    recipe = SeedRecipe()
    ids, weights = encode_example(example, char_ids, 1, 2, 3, recipe)
    offset = 1 + len(example.prompt)
    assert len(ids) == len(weights) == offset + len(example.target) + 1
    assert all(w == 0 for w in weights[1:offset] if w != recipe.reference_weight)
    assert max(weights) == recipe.verdict_weight
    verdict_chars = {example.target[i - offset] for i, w in enumerate(weights) if w == recipe.verdict_weight}
    assert verdict_chars <= set("correctwrong ,incorrect,firstwrongstep0123456789")
    _, phase2_weights = encode_example(example, char_ids, 1, 2, 3, phase2_recipe())
    assert phase2_recipe().result_weight in phase2_weights


def test_weighted_loss_ignores_zero_weight_positions():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    input_ids = torch.tensor([[1, 2, 3, 4, 5]])
    weights = torch.tensor([[0.0, 0.0, 1.0, 0.0, 2.0]])
    changed = logits.clone()
    changed[0, 0, 3] += 5.0  # position 0 predicts input_ids[1], whose weight is 0
    assert torch.allclose(weighted_lm_loss(logits, input_ids, weights), weighted_lm_loss(changed, input_ids, weights))
    changed[0, 1, 0] += 5.0  # position 1 predicts input_ids[2], weight 1
    assert not torch.allclose(weighted_lm_loss(logits, input_ids, weights), weighted_lm_loss(changed, input_ids, weights))


def test_build_seed_runs_every_phase_and_the_careless_solver(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny = SeedRecipe(steps=3, batch_size=2, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      warmup_steps=1, pool_batches=2)
    short = {k: getattr(tiny, k) for k in ("steps", "batch_size", "warmup_steps", "pool_batches")}
    recipes = {1: tiny, 2: replace(phase2_recipe(), **short), 3: replace(phase3_recipe(), **short),
               4: replace(careless_recipe(), **short)}
    seen = []
    out = build_seed(tmp_path / "seed", tmp_path / "careless", recipes=recipes, log=lambda line: None,
                     checkpoint_every=2, on_checkpoint=lambda path, step: seen.append(step))
    info = json.loads((out / "seed_info.json").read_text())
    assert info["phase1"]["trained_steps"] == info["phase2"]["trained_steps"] == info["trained_steps"] == 3
    assert info["recipe"]["mix"] == PHASE3_MIX and info["phase2"]["recipe"]["mix"] == PHASE2_MIX
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32 and seen == [2, 3] * 3
    solver = json.loads((tmp_path / "careless" / "seed_info.json").read_text())
    assert solver["recipe"]["mix"] == CARELESS_MIX and solver["trained_steps"] == 3
    # A build can continue from a finished phase instead of starting from scratch.
    again = build_seed(tmp_path / "again", recipes=recipes, start_phase=3, init_from=tmp_path / ".seed-phase2",
                       log=lambda line: None)
    assert json.loads((again / "seed_info.json").read_text())["started_at_phase"] == 3
    with pytest.raises(ValueError, match="init_from"):
        build_seed(tmp_path / "x", start_phase=2)


def test_careless_solver_corpus_has_every_error_kind():
    from scrit.domains import arith

    rng = random.Random(5)
    kinds = Counter()
    for _ in range(400):
        example = sample_example(rng, CARELESS_MIX)
        problem = arith.parse_problem(example.prompt.split("Problem: ")[1].split("\n")[0])
        kinds[arith.error_kind(problem, arith.split_steps(example.target))] += 1
    assert 0.5 < 1 - kinds["none"] / 400 < 0.7  # CARELESS_ERROR_SHARE of the solutions are wrong
    assert all(kinds[kind] > 30 for kind in arith.ERROR_KINDS)


def test_shipped_seed_checkpoint_is_small_and_loads():
    from transformers import AutoModelForCausalLM

    path = model_dir()
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size <= 25 * 1024 * 1024
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and (path / "seed_info.json").is_file()


def test_shipped_careless_solver_is_small_and_loads():
    from transformers import AutoModelForCausalLM

    from scrit.seed import SOLVER_MODEL_DIRS

    path = SOLVER_MODEL_DIRS["careless"]
    assert sum(f.stat().st_size for f in path.iterdir() if f.is_file()) <= 10 * 1024 * 1024
    AutoModelForCausalLM.from_pretrained(path)
    assert json.loads((path / "seed_info.json").read_text())["recipe"]["mix"] == CARELESS_MIX


def test_missing_seed_gives_a_clear_error(monkeypatch, tmp_path):
    import scrit.seed as seed

    monkeypatch.setattr(seed, "SEED_MODEL_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="scrit seed"):
        seed.model_dir()
    assert SEED_MODEL_DIR.name == "seed_model"
