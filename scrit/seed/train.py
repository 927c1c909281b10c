"""Pretrain the seed critic from scratch on the generated arith corpus (``scrit seed``).

A small Llama-config transformer over a character tokenizer, one example per row (no packing across
examples), loss on the target tokens with extra weight on the verdict tokens (the few tokens that
decide EI-F1 would otherwise drown among the copied ones) and a lighter weight on the reference
solution in the prompt, which is always correct arithmetic.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from scrit.prompts import target_loss_weights
from scrit.seed.corpus import CARELESS_MIX, DEFAULT_MIX, PHASE2_MIX, PHASE3_MIX, Example, sample_example
from scrit.seed.tokenizer import build_char_tokenizer


@dataclass
class SeedRecipe:
    seed: int = 1234
    steps: int = 5000
    batch_size: int = 8
    lr: float = 1.5e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    hidden_size: int = 192
    intermediate_size: int = 576
    num_layers: int = 4
    num_heads: int = 6
    verdict_weight: float = 4.0
    reference_weight: float = 0.3
    result_weight: float = 1.0  # extra weight on computed results (the Y of X op N = Y)
    bf16: bool = True
    pool_batches: int = 16  # examples are drawn in pools of this many batches and bucketed by length
    pad_multiple: int = 32  # round batch widths up: few distinct shapes keep CPU kernel caches small
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    threads: int = 0  # 0 = torch default


def phase2_recipe() -> SeedRecipe:
    """Phase 2: from phase 1's weights, a fresh optimizer, more arithmetic (see corpus.PHASE2_MIX)."""
    return SeedRecipe(seed=4321, steps=3000, lr=1e-3, min_lr=5e-5, warmup_steps=100, result_weight=2.0,
                      mix=dict(PHASE2_MIX))


def phase3_recipe() -> SeedRecipe:
    """Phase 3: from phase 2's weights, long drill rows so arithmetic holds deep in a sequence."""
    return SeedRecipe(seed=5678, steps=1200, lr=5e-4, min_lr=5e-5, warmup_steps=50, result_weight=2.0,
                      mix=dict(PHASE3_MIX))


def careless_recipe() -> SeedRecipe:
    """The careless solver: from the finished seed, solutions that misread and slip (corpus.CARELESS_MIX)."""
    return SeedRecipe(seed=8765, steps=300, lr=3e-4, min_lr=3e-5, warmup_steps=20, mix=dict(CARELESS_MIX))


SEED_PHASES: tuple[Callable[[], SeedRecipe], ...] = (SeedRecipe, phase2_recipe, phase3_recipe)


def build_seed(out_dir: str | Path, solver_dir: str | Path | None = None, *, start_phase: int = 1,
               init_from: str | Path | None = None, recipes: dict[int, SeedRecipe] | None = None,
               log: Callable[[str], None] = print, checkpoint_every: int = 1000,
               on_checkpoint: Callable[[Path, int], None] | None = None) -> Path:
    """The whole documented rebuild: phases 1-3 of the seed critic (the last one into ``out_dir``,
    earlier ones beside it as ``.NAME-phaseK``), then the careless solver into ``solver_dir``.

    ``start_phase`` > 1 continues from ``init_from`` (a finished earlier phase) instead of starting
    from scratch; ``recipes`` replaces the recipe of a phase (by number; 4 = the careless solver).
    """
    out_dir = Path(out_dir)
    recipes = recipes or {}
    if start_phase > 1 and init_from is None:
        raise ValueError(f"start_phase {start_phase} needs init_from (the checkpoint of phase {start_phase - 1})")
    started = time.time()
    previous = Path(init_from) if init_from is not None else None
    phases: dict[str, object] = {}
    for number, default in enumerate(SEED_PHASES, start=1):
        if number < start_phase:
            continue
        target = out_dir if number == len(SEED_PHASES) else out_dir.parent / f".{out_dir.name}-phase{number}"
        train_seed(target, recipes.get(number) or default(), log, checkpoint_every, on_checkpoint, init_from=previous)
        if number < len(SEED_PHASES):
            phases[f"phase{number}"] = json.loads((target / "seed_info.json").read_text())
        previous = target
    info_path = out_dir / "seed_info.json"
    info = json.loads(info_path.read_text())
    info.update(phases, started_at_phase=start_phase, seed_seconds=round(time.time() - started, 1))
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    if solver_dir is not None:
        train_seed(Path(solver_dir), recipes.get(len(SEED_PHASES) + 1) or careless_recipe(), log, checkpoint_every,
                   None, init_from=out_dir)
    info["total_seconds"] = round(time.time() - started, 1)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def build_model(recipe: SeedRecipe, vocab_size: int, tokenizer) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def encode_example(example: Example, char_ids: dict[str, int], bos: int, eos: int, unk: int,
                   recipe: SeedRecipe) -> tuple[list[int], list[float]]:
    """Token ids and per-token loss weights (weight i applies to predicting token i)."""
    text = example.prompt + example.target
    ids = [bos] + [char_ids.get(c, unk) for c in text] + [eos]
    weights = [0.0] * len(ids)
    offset = 1 + len(example.prompt)
    weights[offset:offset + len(example.target)] = target_loss_weights(
        example.target, verdict=recipe.verdict_weight, result=recipe.result_weight)
    weights[-1] = 1.0  # EOS
    if example.reference_span and recipe.reference_weight > 0:
        start, end = example.reference_span
        for i in range(start, end):
            weights[1 + i] = recipe.reference_weight
    return ids, weights


def batches(rng: random.Random, recipe: SeedRecipe, char_ids, bos, eos, unk, pad):
    """Endless length-bucketed batches: (input_ids, attention_mask, weights)."""
    while True:
        pool = [encode_example(sample_example(rng, recipe.mix), char_ids, bos, eos, unk, recipe)
                for _ in range(recipe.batch_size * recipe.pool_batches)]
        pool.sort(key=lambda item: len(item[0]))
        groups = [pool[i:i + recipe.batch_size] for i in range(0, len(pool), recipe.batch_size)]
        rng.shuffle(groups)
        for group in groups:
            longest = max(len(ids) for ids, _ in group)
            width = -(-longest // recipe.pad_multiple) * recipe.pad_multiple
            input_ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            weights = torch.zeros((len(group), width), dtype=torch.float32)
            for row, (ids, w) in enumerate(group):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
                weights[row, : len(w)] = torch.tensor(w)
            yield input_ids, mask, weights


def weighted_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t, weighted per predicted token."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    w = weights[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                               reduction="none").view_as(w)
    return (losses * w).sum() / w.sum().clamp(min=1.0)


def learning_rate(step: int, recipe: SeedRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def train_seed(
    out_dir: str | Path,
    recipe: SeedRecipe,
    log: Callable[[str], None] = print,
    checkpoint_every: int = 1000,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    init_from: str | Path | None = None,
) -> Path:
    """Train (from scratch, or from ``init_from``'s weights) and save an HF checkpoint in ``out_dir``."""
    out_dir = Path(out_dir)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    tokenizer = build_char_tokenizer()
    vocab = tokenizer.get_vocab()
    char_ids = {token: index for token, index in vocab.items() if len(token) == 1}
    if init_from is None:
        model = build_model(recipe, len(tokenizer), tokenizer)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(init_from)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"seed model: {n_params / 1e6:.2f}M parameters; recipe {json.dumps(asdict(recipe))}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.98),
    )
    stream = batches(random.Random(recipe.seed), recipe, char_ids, tokenizer.bos_token_id,
                     tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id)
    model.train()
    started = time.time()
    tokens = 0
    running = None
    for step in range(recipe.steps):
        input_ids, mask, weights = next(stream)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss = weighted_lm_loss(logits, input_ids, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += int(mask.sum())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            elapsed = time.time() - started
            log(f"step {step + 1}/{recipe.steps} loss {running:.4f} lr {learning_rate(step, recipe):.2e} "
                f"{tokens / elapsed:.0f} tok/s elapsed {elapsed / 60:.1f} min")
        if (step + 1) % checkpoint_every == 0 or step + 1 == recipe.steps:
            save_checkpoint(model, tokenizer, out_dir, recipe, step + 1, time.time() - started, n_params)
            if on_checkpoint is not None:
                model.eval()
                on_checkpoint(out_dir, step + 1)
                model.train()
    return out_dir


def save_checkpoint(model, tokenizer, out_dir: Path, recipe: SeedRecipe, step: int, seconds: float,
                    n_params: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir)
    info = {"recipe": asdict(recipe), "trained_steps": step, "train_seconds": round(seconds, 1),
            "parameters": n_params, "torch_threads": torch.get_num_threads()}
    (out_dir / "seed_info.json").write_text(json.dumps(info, indent=2) + "\n")


def _portable_tokenizer_config(out_dir: Path) -> None:
    """Declare the generic fast-tokenizer class so transformers 4 (vLLM's) and 5 both load the directory."""
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")
