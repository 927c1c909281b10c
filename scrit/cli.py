"""The ``scrit`` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SCRIT: a self-evolving critic trained by actor-based self-play on Ray.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _prompt_style(spec: str, style: str) -> str:
    """'compact' for the seed family (their corpus taught them the format), 'instruct' for real LLMs."""
    if style != "auto":
        return style
    if spec == "seed":
        return "compact"
    if spec.startswith(("http://", "https://")):
        return "instruct"
    return "compact" if (Path(spec) / "seed_info.json").is_file() else "instruct"


def _open_backend(spec: str, batch_size: int, device: str):
    from scrit.backends import make_backend

    if spec.startswith(("http://", "https://")):
        return make_backend(spec, concurrency=batch_size)
    return make_backend(spec, batch_size=batch_size, device=device)


@app.command("eval")
def eval_command(
    model: str = typer.Option("seed", help="'seed', an HF model directory, or an http(s):// OpenAI-compatible base URL"),
    bench: str = typer.Option("arith", help="arith | processbench | realcritic | jsonl"),
    data: Optional[str] = typer.Option(None, help="data file or directory (required except for the built-in arith set)"),
    split: Optional[str] = typer.Option(None, help="evaluate one split only"),
    limit: Optional[int] = typer.Option(None, help="at most N items per split (arith: N items in all)"),
    mode: str = typer.Option("direct", help="direct | contrastive (critic sees the reference) | solve (score as a solver)"),
    batch_size: int = typer.Option(32, help="prompts per generation batch"),
    max_new_tokens: int = typer.Option(512),
    prompt_style: str = typer.Option("auto", help="compact | instruct | auto (compact for seed-family models)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda (HF backend)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line of stdout"),
) -> None:
    """Score a critic (DESIGN.md §6): EI-F1, its SCRIT variant and CC-Acc per split."""
    from scrit.evaluate import MODES, evaluate, load_bench

    if mode not in MODES:
        _fail(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        items = load_bench(bench, data, split, limit)
        if not items:
            _fail("no evaluation items selected")
        backend = _open_backend(model, batch_size, device)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        _fail(str(error))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.time()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"{bench}/{mode}", total=len(items))
        try:
            report = evaluate(backend, items, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              style=_prompt_style(model, prompt_style),
                              on_batch=lambda n: progress.advance(task, n))
        except ValueError as error:
            _fail(str(error))
    result = {"model": model, "mode": mode, "bench": bench, **report, "seconds": round(time.time() - started, 1)}
    if as_json:
        print(json.dumps(result))
    else:
        _print_table(result)


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = {**result["splits"], "average": result["average"]}
    keys = [k for k in next(iter(rows.values())) if k != "n"]
    table = Table(title=f"{result['model']} · {result['bench']} · {result['mode']} ({result['seconds']} s)")
    table.add_column("split")
    table.add_column("n", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    for name, metrics in rows.items():
        cells = ["-" if metrics.get(k) is None else f"{metrics[k]:.3f}" for k in keys]
        table.add_row(name, str(metrics["n"]), *cells)
    Console().print(table)


@app.command("seed")
def seed_command(
    out: Optional[Path] = typer.Option(None, help="output directory (default: the shipped seed_model directory)"),
    steps: Optional[int] = typer.Option(None, help="optimizer steps (default: the documented recipe)"),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None, help="random seed of the corpus and the initialization"),
    probe_every: int = typer.Option(1000, help="checkpoint and probe held-out accuracy every N steps"),
) -> None:
    """Rebuild the seed critic from scratch on the generated arith corpus (CPU: about 70 min)."""
    from dataclasses import replace

    from scrit.seed import SEED_MODEL_DIR
    from scrit.seed.train import SeedRecipe, train_seed

    recipe = SeedRecipe()
    overrides = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}.items()
                 if v is not None}
    recipe = replace(recipe, **overrides)
    target = out or SEED_MODEL_DIR

    def probe(path: Path, step: int) -> None:
        from scrit.backends.hf import load_tokenizer
        from scrit.seed.monitor import probe as run_probe
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path).eval()
        scores = run_probe(model, load_tokenizer(path))
        typer.echo(f"probe at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))

    train_seed(target, recipe, log=lambda line: typer.echo(line), checkpoint_every=probe_every, on_checkpoint=probe)
    typer.echo(f"seed model written to {target}")


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
