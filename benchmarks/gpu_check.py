"""One-shot GPU check of the project's own training and generation code (one CUDA device).

    PYTHONPATH=/tmp/gpu_site:. python3 benchmarks/gpu_check.py                 # on the GPU machine
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_check.py --cpu-dry-run    # tiny sizes, CPU, gloo

Parts (each wrapped: one failing part prints its traceback and the others still report):

* ``train_seed``: the shipped seed critic under DeepSpeed ZeRO-3 (``scrit.train.trainer.deepspeed_config``
  and ``lr_scheduler``, a torch AdamW client optimizer, DeepSpeed bf16 on GPU as ``train_loop_per_worker``
  does) on loop-shaped arith training examples (``benchmarks/trainer.py``'s ``example_pool``, 6-8 operations), with the
  project's ``encode_examples`` / ``sft_loss``; held-out loss before and after, tokens/s, peak memory,
  the consolidated 16-bit state dict saved through the trainer's ``_save_version`` and reloaded.
* ``train_big``: a randomly initialised ~0.8B Llama (hidden 2048, 16 layers) at batch 4 x 1024 tokens:
  plain torch (fp32 weights, AdamW, bf16 autocast, the DDP path's step) vs DeepSpeed ZeRO-3 (the
  trainer's config), tokens/s and peak memory side by side.
* ``generate``: the HF backend (``scrit.backends.hf.HFBackend``) on the held-out arith eval set, direct
  mode, greedy: tokens/s and EI-F1 / CC-Acc on CUDA (bf16), and CUDA bf16 / CUDA fp32 / CPU fp32 on the
  same items compared text for text.

Writes ``$OUT/gpu_check.json`` (``OUT`` defaults to /tmp) and prints one summary block.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
# The project is not pip-installed on the GPU machine: the checkout goes first on sys.path, and
# scrit/__init__.py maps scrit.train / scrit.actors / scrit.serve onto ./train etc. itself.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU (gloo, DS_ACCELERATOR=cpu)")
    parser.add_argument("--parts", default="train_seed,train_big,generate")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp")
    parser.add_argument("--seed-steps", type=int, default=None, help="optimizer steps on the seed (GPU: 30)")
    parser.add_argument("--big-steps", type=int, default=None, help="timed steps on the big model (GPU: 10)")
    parser.add_argument("--gen-items", type=int, default=None, help="eval items on CUDA (GPU: 64)")
    parser.add_argument("--cpu-items", type=int, default=None, help="items compared CPU vs CUDA (GPU: 32)")
    return parser.parse_args()


ARGS = parse_args()
DRY = ARGS.cpu_dry_run
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if DRY:
    os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is first imported
for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402

CUDA = not DRY
DEVICE = torch.device("cuda:0" if CUDA else "cpu")

# Sizes: (GPU, dry run)
SEED_STEPS = ARGS.seed_steps or (30 if CUDA else 3)
SEED_BATCH, SEED_GA = (8, 2) if CUDA else (4, 1)
SEED_WARMUP = 2 if CUDA else 1  # micro-steps not timed
HELDOUT = 32 if CUDA else 8
BIG = (dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, intermediate_size=5632)
       if CUDA else dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
BIG_BATCH, BIG_SEQ = (4, 1024) if CUDA else (2, 128)
BIG_STEPS = ARGS.big_steps or (10 if CUDA else 3)
BIG_WARMUP = 2 if CUDA else 1
GEN_ITEMS = ARGS.gen_items or (64 if CUDA else 4)
CPU_ITEMS = ARGS.cpu_items or (32 if CUDA else 2)
MAX_NEW_TOKENS = 512

RESULTS: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------------
# helpers


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def now() -> float:
    sync()
    return time.perf_counter()


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def mem_reset() -> int:
    """Free what can be freed, reset the peak counter; returns the bytes still allocated (the baseline)."""
    gc.collect()
    if not CUDA:
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def mem_peak() -> int:
    return torch.cuda.max_memory_allocated() if CUDA else 0


def run_part(name: str, fn: Callable[[], dict[str, Any]]) -> None:
    print(f"\n===== {name} =====", flush=True)
    started = time.perf_counter()
    try:
        RESULTS[name] = {"ok": True, **fn()}
    except BaseException as error:  # noqa: BLE001 - one failing part must not stop the others
        if isinstance(error, KeyboardInterrupt):
            raise
        text = traceback.format_exc()
        print(text, flush=True)
        RESULTS[name] = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": text}
    RESULTS[name]["part_s"] = round(time.perf_counter() - started, 2)
    write_json()
    print(f"===== {name} done in {RESULTS[name]['part_s']} s (ok={RESULTS[name]['ok']}) =====", flush=True)


def write_json() -> Path:
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    path.write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
    return path


def seed_path() -> str:
    from scrit.backends import resolve_model_path

    return resolve_model_path("seed")


def train_settings(**overrides: Any) -> dict[str, Any]:
    """A ``TrainConfig`` (validated) as the plain dict the trainer's workers get."""
    import msgspec

    from scrit.config import TrainConfig

    return msgspec.to_builtins(msgspec.convert({"strategy": "deepspeed", "zero_stage": 3, **overrides}, TrainConfig))


_DIST_READY = False


def init_distributed() -> str:
    global _DIST_READY
    backend = "nccl" if CUDA else "gloo"
    if not _DIST_READY:
        import deepspeed

        if CUDA:
            torch.cuda.set_device(DEVICE)  # NCCL uses the current device
        deepspeed.init_distributed(dist_backend=backend)
        _DIST_READY = True
    return backend


def release_engine(engine: Any) -> None:
    if engine is not None and hasattr(engine, "destroy"):
        try:
            engine.destroy()  # removes ZeRO-3's hooks
        except Exception as error:  # noqa: BLE001
            print(f"engine.destroy() failed: {error}", flush=True)


# --------------------------------------------------------------------------------------------------
# part 1a: the seed critic under ZeRO-3


def part_train_seed() -> dict[str, Any]:
    import deepspeed
    from transformers import AutoModelForCausalLM

    from scrit.backends.hf import load_tokenizer
    from scrit.train.sft import LossWeights, encode_examples, sft_loss
    from scrit.train.trainer import _save_version, deepspeed_config, lr_scheduler

    backend = init_distributed()
    torch.manual_seed(0)
    train = train_settings(batch_size=SEED_BATCH, grad_accum=SEED_GA, steps_per_version=SEED_STEPS)
    path = seed_path()
    tokenizer = load_tokenizer(path)
    # The seed is already near its floor on the loop's default 2-5 operation chains (held-out loss ~0.01,
    # which 30 steps at the default lr only move by noise), so it trains on longer chains (the arith-hard
    # range, 6-8 operations: loss ~0.6) from the training bucket, and the held-out loss that must go down is
    # on 6-8 operation chains from the held-out bucket; the 2-5 operation held-out loss is reported beside it.
    from benchmarks.trainer import example_pool
    from scrit.evaluate import ARITH_HARD_OPS

    train_examples = example_pool(SEED_BATCH * SEED_GA * SEED_STEPS, 11, "train", ARITH_HARD_OPS)
    heldout_examples = example_pool(HELDOUT, 12, "heldout", ARITH_HARD_OPS)
    easy_examples = example_pool(HELDOUT, 13, "heldout", (2, 5))
    weights = LossWeights.from_train_config(train)

    def encode(examples: list, weighted: bool) -> dict[str, Any]:
        batch = encode_examples(tokenizer, examples, int(train["max_seq_len"]), weights=weights if weighted else None)
        return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    heldout = [encode(heldout_examples[i:i + 8], weighted=False) for i in range(0, HELDOUT, 8)]
    heldout_easy = [encode(easy_examples[i:i + 8], weighted=False) for i in range(0, HELDOUT, 8)]

    base = mem_reset()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    ds_bf16 = CUDA and torch.cuda.is_bf16_supported() and bool(train["bf16"])  # as train_loop_per_worker
    autocast_bf16 = bool(train["bf16"]) and not ds_bf16
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(train["lr"]), weight_decay=float(train["weight_decay"]))
    scheduler = lr_scheduler(optimizer, train, SEED_STEPS, 0)
    ds_config = deepspeed_config(train, 1, ds_bf16)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model.to(DEVICE), optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
    )
    peak_init = mem_peak()

    def autocast() -> Any:
        import contextlib

        return torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()

    def heldout_loss(forward: Any, batches: list | None = None) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in (heldout if batches is None else batches):
                with autocast():
                    loss, n = sft_loss(forward, batch)
                total += float(loss) * n
                count += n
        return total / max(count, 1)

    engine.eval()
    loss_before = heldout_loss(engine)
    easy_before = heldout_loss(engine, heldout_easy)
    engine.train()

    train_losses: list[float] = []
    tokens = 0
    timed_from = None
    micro_total = SEED_STEPS * SEED_GA
    # Tokenised up front: the trainer's compute window starts after sampling and encoding too.
    batches = [encode(train_examples[m * SEED_BATCH:(m + 1) * SEED_BATCH], weighted=True) for m in range(micro_total)]
    for micro in range(micro_total):
        if micro == SEED_WARMUP:
            tokens, timed_from = 0, now()
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
        batch = batches[micro]
        with autocast():
            loss, _ = sft_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        train_losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
    elapsed = now() - timed_from if timed_from is not None else float("nan")
    peak_steps = mem_peak()
    grad_norm = engine.get_global_grad_norm()

    engine.eval()
    loss_after = heldout_loss(engine)
    easy_after = heldout_loss(engine, heldout_easy)
    engine.train()

    # The trainer's publish path: consolidated 16-bit state dict, saved with _save_version, reloaded.
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    sd_shapes = {name: tuple(t.shape) for name, t in state_dict.items()}
    missing = sorted(set(shapes) - set(sd_shapes))
    extra = sorted(set(sd_shapes) - set(shapes))
    mismatched = {k: (sd_shapes[k], shapes[k]) for k in set(shapes) & set(sd_shapes) if sd_shapes[k] != shapes[k]}
    tied_only = all(k.startswith("lm_head.") for k in missing)  # tie_word_embeddings: lm_head is embed_tokens
    sd_dtypes = sorted({str(t.dtype) for t in state_dict.values()})
    run_dir = tempfile.mkdtemp(prefix="gpu-check-run-")
    saved = _save_version(engine.module, state_dict, tokenizer, run_dir, 1, path, SEED_STEPS, 0)
    reloaded = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32, local_files_only=True).to(DEVICE)
    reloaded.eval()
    reloaded_sd = reloaded.state_dict()
    max_diff = max(float((reloaded_sd[k].float() - state_dict[k].to(DEVICE).float()).abs().max())
                   for k in state_dict if k in reloaded_sd)
    reloaded_shapes_ok = all(tuple(reloaded_sd[k].shape) == shapes[k] for k in shapes if k in reloaded_sd)
    with torch.no_grad():
        total, count = 0.0, 0
        for batch in heldout:
            with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16, enabled=ds_bf16 or autocast_bf16):
                loss, n = sft_loss(reloaded, batch)
            total += float(loss) * n
            count += n
    reloaded_loss = total / max(count, 1)
    files = sorted(p.name for p in Path(saved).iterdir())

    release_engine(engine)
    del engine, optimizer, scheduler, model, reloaded, state_dict, reloaded_sd
    mem_reset()
    return {
        "dist_backend": backend,
        "params": n_params,
        "ds_bf16": ds_bf16,
        "autocast_bf16": autocast_bf16,
        "deepspeed_config": ds_config,
        "optimizer_steps": SEED_STEPS,
        "micro_batch": SEED_BATCH,
        "grad_accum": SEED_GA,
        "heldout_loss_before": round(loss_before, 5),
        "heldout_loss_after": round(loss_after, 5),
        "loss_went_down": loss_after < loss_before,
        "heldout_2to5_ops_loss_before": round(easy_before, 5),
        "heldout_2to5_ops_loss_after": round(easy_after, 5),
        "train_ops": list(ARITH_HARD_OPS),
        "train_loss_first": [round(x, 4) for x in train_losses[:SEED_GA * 2]],
        "train_loss_last": [round(x, 4) for x in train_losses[-SEED_GA * 2:]],
        "last_grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed == elapsed and elapsed > 0 else None,
        "timed_micro_steps": micro_total - SEED_WARMUP,
        "peak_gib_init": gib(peak_init - base),
        "peak_gib_steps": gib(peak_steps),
        "consolidated_keys": len(sd_shapes),
        "consolidated_dtypes": sd_dtypes,
        "consolidated_missing": missing,
        "consolidated_extra": extra,
        "consolidated_shape_mismatch": {k: list(map(list, v)) for k, v in mismatched.items()},
        "consolidated_ok": not extra and not mismatched and tied_only and bool(sd_shapes),
        "saved_files": files,
        "reloaded_shapes_ok": reloaded_shapes_ok,
        "reloaded_max_abs_diff_vs_state_dict": max_diff,
        "reloaded_heldout_loss": round(reloaded_loss, 5),
    }


# --------------------------------------------------------------------------------------------------
# part 1b: a ~0.8B random Llama, plain torch vs ZeRO-3


def part_train_big() -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from scrit.backends.hf import load_tokenizer
    from scrit.train.sft import sft_loss
    from scrit.train.trainer import deepspeed_config, lr_scheduler

    tokenizer = load_tokenizer(seed_path())
    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, num_key_value_heads=BIG["num_attention_heads"],
                         max_position_embeddings=max(BIG_SEQ, 1024), tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, use_cache=False, **BIG)
    train = train_settings(batch_size=BIG_BATCH, grad_accum=1, max_seq_len=max(BIG_SEQ, 16), lr=1e-4,
                           warmup_steps=0, lr_schedule="constant")
    total = BIG_WARMUP + BIG_STEPS
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(total):
        ids = torch.randint(3, vocab, (BIG_BATCH, BIG_SEQ), generator=generator)
        batches.append({"input_ids": ids.to(DEVICE), "attention_mask": torch.ones_like(ids).to(DEVICE),
                        "labels": ids.clone().to(DEVICE)})
    bf16 = (not CUDA) or torch.cuda.is_bf16_supported()

    def build() -> Any:
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.to(DEVICE)  # a no-op when the device context already placed it there
        model.train()
        return model

    out: dict[str, Any] = {"config": {**BIG, "vocab_size": vocab, "batch": BIG_BATCH, "seq": BIG_SEQ},
                           "timed_steps": BIG_STEPS}

    # ---- plain torch: fp32 weights, AdamW, bf16 autocast (the DDP path's step, without DDP)
    base = mem_reset()
    model = build()
    out["params"] = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(train["lr"]), weight_decay=float(train["weight_decay"]))
    scheduler = lr_scheduler(optimizer, train, total, 0)
    losses, started = [], None
    for step, batch in enumerate(batches):
        if step == BIG_WARMUP:
            started = now()
        with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = sft_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(train["max_grad_norm"]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    elapsed = now() - started
    tokens = BIG_STEPS * BIG_BATCH * BIG_SEQ
    out["plain"] = {"tokens_per_s": round(tokens / elapsed, 1), "s_per_step": round(elapsed / BIG_STEPS, 4),
                    "peak_gib": gib(mem_peak() - base), "losses": [round(x, 4) for x in losses]}
    print(f"plain: {out['plain']}", flush=True)
    del model, optimizer, scheduler, loss

    # ---- DeepSpeed ZeRO-3 as train_loop_per_worker builds it (a failure here keeps the plain numbers)
    try:
        zero3_half(out, build, train, total, batches, tokens, deepspeed_config, lr_scheduler, sft_loss)
    except Exception as error:  # noqa: BLE001
        text = traceback.format_exc()
        print(text, flush=True)
        out["zero3"] = {"error": f"{type(error).__name__}: {error}", "traceback": text}
    del batches
    mem_reset()
    return out


def zero3_half(out: dict[str, Any], build: Callable[[], Any], train: dict[str, Any], total: int, batches: list,
               tokens: int, deepspeed_config: Any, lr_scheduler: Any, sft_loss: Any) -> None:
    import deepspeed

    init_distributed()
    base = mem_reset()
    ds_bf16 = CUDA and torch.cuda.is_bf16_supported()
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(train["lr"]), weight_decay=float(train["weight_decay"]))
    scheduler = lr_scheduler(optimizer, train, total, 0)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(train, 1, ds_bf16),
    )
    peak_init = mem_peak() - base
    if CUDA:
        torch.cuda.reset_peak_memory_stats()  # the steps' own peak, without init's transient copies
    losses, started = [], None
    for step, batch in enumerate(batches):
        if step == BIG_WARMUP:
            started = now()
        with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16, enabled=not ds_bf16):
            loss, _ = sft_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    elapsed = now() - started
    out["zero3"] = {"tokens_per_s": round(tokens / elapsed, 1), "s_per_step": round(elapsed / BIG_STEPS, 4),
                    "peak_gib": gib(mem_peak() - base), "peak_gib_init": gib(peak_init), "ds_bf16": ds_bf16,
                    "allocated_gib_after": gib((torch.cuda.memory_allocated() if CUDA else 0) - base),
                    "losses": [round(x, 4) for x in losses]}
    print(f"zero3: {out['zero3']}", flush=True)
    out["zero3_over_plain_tokens_per_s"] = round(out["zero3"]["tokens_per_s"] / out["plain"]["tokens_per_s"], 3)
    out["zero3_over_plain_peak_mem"] = (round(out["zero3"]["peak_gib"] / out["plain"]["peak_gib"], 3)
                                        if out["plain"]["peak_gib"] else None)
    out["first_loss_plain_vs_zero3"] = [out["plain"]["losses"][0], out["zero3"]["losses"][0]]
    out["losses_finite"] = all(x == x and abs(x) != float("inf") for x in out["plain"]["losses"] + losses)
    release_engine(engine)
    del engine, optimizer, scheduler, model, loss


# --------------------------------------------------------------------------------------------------
# part 2: generation with the HF backend


def part_generate() -> dict[str, Any]:
    from scrit.backends.base import SamplingParams
    from scrit.backends.hf import HFBackend
    from scrit.evaluate import build_arith_evalset, build_prompts, evaluate, score_critiques, score_texts
    from scrit.prompts import resolve_prompt_style

    path = seed_path()
    style = resolve_prompt_style(path, "auto")
    items = build_arith_evalset(n=GEN_ITEMS)
    prompts = build_prompts(items, "direct", style)
    sampling = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    out: dict[str, Any] = {"style": style, "items": len(items), "max_new_tokens": MAX_NEW_TOKENS}

    def run(device: str, dtype: str, chosen: list[str], batch_size: int) -> tuple[list[Any], float, Any]:
        backend = HFBackend(path, device=device, dtype=dtype, batch_size=batch_size)
        backend.generate(chosen[:2], SamplingParams(max_new_tokens=8, temperature=0.0))  # warm-up
        started = now()
        generations = backend.generate(chosen, sampling)
        elapsed = now() - started
        return generations, elapsed, backend

    def summary(generations: list[Any], elapsed: float) -> dict[str, Any]:
        completion = sum(g.completion_tokens for g in generations)
        return {"completion_tokens": completion, "seconds": round(elapsed, 3),
                "tokens_per_s": round(completion / elapsed, 1) if elapsed > 0 else None,
                "hit_max_new_tokens": sum(g.completion_tokens >= MAX_NEW_TOKENS for g in generations)}

    main_device = "cuda" if CUDA else "cpu"
    base = mem_reset()
    generations, elapsed, backend = run(main_device, "auto", prompts, len(prompts))
    out["main"] = {"device": main_device, "dtype": str(backend.dtype), "batch_size": len(prompts),
                   **summary(generations, elapsed), "peak_gib": gib(mem_peak() - base)}
    texts = [g.text for g in generations]
    out["main"]["metrics"] = score_texts(items, texts, "direct")
    out["sample_critique"] = texts[0][:600]
    # scrit.evaluate.evaluate (what `scrit eval` runs) on the same backend and batch: the same scores expected.
    started = now()
    report = evaluate(backend, items, mode="direct", batch_size=len(items), max_new_tokens=MAX_NEW_TOKENS, style=style)
    out["evaluate_seconds"] = round(now() - started, 3)
    out["evaluate_average"] = report["average"]
    out["evaluate_matches_scored_texts"] = report["average"] == out["main"]["metrics"]["average"]
    del backend
    print(f"main: {out['main']}", flush=True)

    # Same items, same batch, three ways: bf16 CUDA, fp32 CUDA, fp32 CPU.
    n = min(CPU_ITEMS, len(items))
    sub_items, sub_prompts = items[:n], prompts[:n]
    runs: dict[str, list[str]] = {}
    variants = [("cuda_bf16", "cuda", "auto"), ("cuda_fp32", "cuda", "float32"), ("cpu_fp32", "cpu", "float32")]
    if not CUDA:
        variants = [("cpu_bf16", "cpu", "bfloat16"), ("cpu_fp32", "cpu", "float32")]
    for name, device, dtype in variants:
        generations, elapsed, backend = run(device, dtype, sub_prompts, n)
        runs[name] = [g.text for g in generations]
        out[name] = {**summary(generations, elapsed), "dtype": str(backend.dtype),
                     "metrics_average": score_texts(sub_items, runs[name], "direct")["average"]}
        del backend
        print(f"{name}: {out[name]}", flush=True)
    mem_reset()

    def compare(a: str, b: str) -> dict[str, Any]:
        verdicts_a = [r.predicted for r in score_critiques(sub_items, runs[a])]
        verdicts_b = [r.predicted for r in score_critiques(sub_items, runs[b])]
        return {"items": n, "identical_text": sum(x == y for x, y in zip(runs[a], runs[b])),
                "same_first_wrong_step": sum(x == y for x, y in zip(verdicts_a, verdicts_b))}

    names = list(runs)
    out["compare"] = {f"{names[i]}_vs_{names[j]}": compare(names[i], names[j])
                      for i in range(len(names)) for j in range(i + 1, len(names))}
    return out


# --------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "dry_run": DRY,
                            "device": str(DEVICE), "root": str(ROOT)}
    for name in ("transformers", "deepspeed", "msgspec", "pydantic"):
        try:
            info[name] = __import__(name).__version__
        except Exception as error:  # noqa: BLE001
            info[name] = f"unavailable: {error}"
    import scrit
    import scrit.train

    info["scrit_file"] = scrit.__file__
    info["scrit_train_file"] = scrit.train.__file__
    if CUDA:
        info["cuda_available"] = torch.cuda.is_available()
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["cuda"] = torch.version.cuda
    return info


def print_summary(total_s: float) -> None:
    def get(part: str, *keys: str) -> Any:
        value: Any = RESULTS.get(part, {})
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    env = RESULTS.get("environment", {})
    lines = ["", "=" * 30 + " GPU CHECK SUMMARY " + "=" * 30,
             f"device {env.get('gpu', env.get('device'))}  torch {env.get('torch')}  transformers "
             f"{env.get('transformers')}  deepspeed {env.get('deepspeed')}  dry_run={DRY}  total {total_s:.1f} s"]
    for part in ("train_seed", "train_big", "generate"):
        if part not in RESULTS:
            continue
        if not RESULTS[part].get("ok"):
            lines.append(f"[{part}] FAILED: {RESULTS[part].get('error')}")
            continue
        r = RESULTS[part]
        if part == "train_seed":
            lines.append(
                f"[train_seed] ZeRO-3 bf16={r['ds_bf16']} {r['optimizer_steps']} steps: held-out loss (6-8 ops) "
                f"{r['heldout_loss_before']} -> {r['heldout_loss_after']} (down: {r['loss_went_down']}; 2-5 ops "
                f"{r['heldout_2to5_ops_loss_before']} -> {r['heldout_2to5_ops_loss_after']}); "
                f"{r['tokens_per_s']} tok/s; peak {r['peak_gib_steps']} GiB")
            lines.append(
                f"             consolidated state dict ok={r['consolidated_ok']} ({r['consolidated_keys']} tensors, "
                f"{r['consolidated_dtypes']}, missing={r['consolidated_missing']}); saved+reloaded shapes ok="
                f"{r['reloaded_shapes_ok']} max|diff|={r['reloaded_max_abs_diff_vs_state_dict']:.3g} reloaded loss "
                f"{r['reloaded_heldout_loss']}")
        elif part == "train_big":
            if "error" in r.get("zero3", {}):
                lines.append(f"[train_big] plain {r['plain']['tokens_per_s']} tok/s peak {r['plain']['peak_gib']} GiB; "
                             f"ZeRO-3 FAILED: {r['zero3']['error']}")
                continue
            lines.append(
                f"[train_big] {r['params'] / 1e9:.3f}B params, batch {r['config']['batch']} x {r['config']['seq']}: "
                f"plain {r['plain']['tokens_per_s']} tok/s peak {r['plain']['peak_gib']} GiB | ZeRO-3 "
                f"{r['zero3']['tokens_per_s']} tok/s peak {r['zero3']['peak_gib']} GiB in steps (init {r['zero3']['peak_gib_init']})")
            lines.append(
                f"            ZeRO-3/plain: tok/s {r['zero3_over_plain_tokens_per_s']}x, peak mem "
                f"{r['zero3_over_plain_peak_mem']}x; first loss plain/zero3 {r['first_loss_plain_vs_zero3']}; "
                f"finite={r['losses_finite']}")
        else:
            m = r["main"]
            avg = m["metrics"]["average"]
            short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in avg.items()}
            lines.append(f"[generate] {m['device']} {m['dtype']} {r['items']} items: {m['tokens_per_s']} tok/s "
                         f"({m['completion_tokens']} tokens in {m['seconds']} s, peak {m['peak_gib']} GiB)")
            lines.append(f"           metrics {short}; scrit.evaluate.evaluate() same: {r['evaluate_matches_scored_texts']}")
            for name, c in r["compare"].items():
                lines.append(f"           {name}: identical text {c['identical_text']}/{c['items']}, same first wrong "
                             f"step {c['same_first_wrong_step']}/{c['items']}")
            for name in ("cuda_bf16", "cuda_fp32", "cpu_fp32", "cpu_bf16"):
                if name in r:
                    lines.append(f"           {name}: {r[name]['tokens_per_s']} tok/s")
    lines.append(f"json: {Path(ARGS.out) / 'gpu_check.json'}")
    lines.append("=" * 79)
    print("\n".join(lines), flush=True)


def main() -> None:
    started = time.perf_counter()
    if DRY:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-dry-run")
    RESULTS["environment"] = environment()
    print(json.dumps(RESULTS["environment"], indent=2), flush=True)
    parts = {"train_seed": part_train_seed, "train_big": part_train_big, "generate": part_generate}
    for name in ARGS.parts.split(","):
        run_part(name, parts[name])
    RESULTS["total_s"] = round(time.perf_counter() - started, 2)
    write_json()
    print_summary(RESULTS["total_s"])
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    main()
