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


def _open_backend(spec: str, batch_size: int, device: str, style: str = "auto", backend: str = "hf",
                  dtype: str = "auto"):
    """The backend for ``--model``, built by the factory as a run builds its roles' engines (instruct
    models get their chat template; ``vllm`` takes the default ``vllm.*`` engine options)."""
    from scrit.backends import resolve_model_path
    from scrit.config import default_config
    from scrit.factory import build_backend, engine_spec
    from scrit.prompts import resolve_prompt_style

    path = resolve_model_path(spec)
    kind = "http" if path.startswith(("http://", "https://")) else backend
    return build_backend(engine_spec(default_config(), "eval", path, kind, resolve_prompt_style(path, style),
                                     device=device, dtype=dtype, batch_size=batch_size))


@app.command("eval")
def eval_command(
    model: str = typer.Option("seed", help="'seed', an HF model directory, or an http(s):// OpenAI-compatible base URL"),
    bench: str = typer.Option("arith", help="arith (2-5 operations) | arith-hard (6-8) | processbench | realcritic | jsonl"),
    data: Optional[str] = typer.Option(None, help="data file or directory (required except for the built-in arith set)"),
    split: Optional[str] = typer.Option(None, help="evaluate one split only"),
    limit: Optional[int] = typer.Option(None, help="at most N items per split (arith: N items in all)"),
    mode: str = typer.Option("direct", help="direct | contrastive (critic sees the reference) | solve (score as a solver)"),
    batch_size: int = typer.Option(32, help="prompts per generation batch"),
    max_new_tokens: int = typer.Option(512),
    prompt_style: str = typer.Option("auto", help="compact | instruct | auto (compact for seed-family models)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda (HF backend)"),
    backend: str = typer.Option("hf", help="hf | vllm (the engine that generates the critiques)"),
    dtype: str = typer.Option("auto", help="auto (float32 on CPU: the HF backend's scores) | float32 | bfloat16 "
                                           "(vLLM on a CPU with AMX: ~1.8x faster) | float16"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line of stdout"),
) -> None:
    """Score a critic (DESIGN.md §6): EI-F1, its SCRIT variant and CC-Acc per split."""
    from typing import get_args

    from scrit.config import DType
    from scrit.evaluate import MODES, evaluate, load_bench
    from scrit.prompts import resolve_prompt_style

    if mode not in MODES:
        _fail(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if backend not in ("hf", "vllm"):
        _fail(f"--backend must be hf or vllm, got {backend!r}")
    if dtype not in get_args(DType):
        _fail(f"--dtype must be one of {', '.join(get_args(DType))}, got {dtype!r}")
    try:
        items = load_bench(bench, data, split, limit)
        if not items:
            _fail("no evaluation items selected")
        engine = _open_backend(model, batch_size, device, prompt_style, backend, dtype)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as error:
        _fail(str(error))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.time()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"{bench}/{mode}", total=len(items))
        try:
            report = evaluate(engine, items, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              style=resolve_prompt_style(model, prompt_style),
                              on_batch=lambda n: progress.advance(task, n))
        except ValueError as error:
            _fail(str(error))
    result = {"model": model, "backend": backend, "dtype": dtype, "mode": mode, "bench": bench, **report,
              "seconds": round(time.time() - started, 1)}
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
    solver_out: Optional[Path] = typer.Option(None, help="careless solver output (default: the shipped "
                                                          "solver_models/careless directory)"),
    from_phase: int = typer.Option(1, help="start at this phase (2 or 3 need --init: the previous phase's checkpoint)"),
    init: Optional[Path] = typer.Option(None, help="checkpoint to continue from when --from-phase > 1"),
    probe_every: int = typer.Option(1000, help="checkpoint and probe held-out accuracy every N steps"),
) -> None:
    """Rebuild the seed critic (three phases) and the careless solver from scratch (see the README)."""
    from scrit.seed import SEED_MODEL_DIR, SOLVER_MODEL_DIRS
    from scrit.seed.train import build_seed

    target = out or SEED_MODEL_DIR
    if from_phase > 1 and (init is None or not (init / "config.json").is_file()):
        _fail(f"--from-phase {from_phase} needs --init DIR, the checkpoint of phase {from_phase - 1}")

    def probe(path: Path, step: int) -> None:
        from transformers import AutoModelForCausalLM

        from scrit.backends.hf import load_tokenizer
        from scrit.seed.monitor import probe as run_probe

        model = AutoModelForCausalLM.from_pretrained(path).eval()
        scores = run_probe(model, load_tokenizer(path))
        typer.echo(f"probe at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))

    build_seed(target, solver_out or SOLVER_MODEL_DIRS["careless"], start_phase=from_phase, init_from=init,
               log=lambda line: typer.echo(line), checkpoint_every=probe_every, on_checkpoint=probe)
    typer.echo(f"seed model written to {target}; careless solver to {solver_out or SOLVER_MODEL_DIRS['careless']}")


@app.command("run")
def run_command(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (default: built-in arith + seed)"),
    overrides: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set train.lr=1e-4"),
    run_dir: Optional[Path] = typer.Option(None, help="run directory (default: run.run_dir from the config)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last published version and the buffer "
                                                        "(with RUN_DIR/config.yaml unless --config is given)"),
    keep_serving: bool = typer.Option(False, "--keep-serving",
                                      help="keep the critic endpoint up after the run ends, until Ctrl-C"),
) -> None:
    """Run the self-play loop: solvers, critic, validator, replay buffer, Ray Train, hot swap."""
    from scrit.config import ConfigError, load_config

    if resume and config is None:
        from scrit.config import default_config

        config = (run_dir or Path(default_config().run.run_dir)) / "config.yaml"  # the run keeps its config
        if not config.is_file():
            _fail(f"--resume: {config} not found; pass --config")
    try:
        cfg = load_config(config, [*overrides, *(["run.keep_serving=true"] if keep_serving else [])])
    except ConfigError as error:
        _fail(str(error))
    from rich.console import Console

    from scrit.actors.run import RunDirError, SelfPlayRun
    from scrit.progress import RunDisplay
    from scrit.rundir import stop_signals_interrupt

    stop_signals_interrupt()  # SIGTERM (`ray job stop`) ends the run like Ctrl-C: summary, status interrupted

    console = Console(stderr=True)
    directory = run_dir or Path(cfg.run.run_dir)
    console.print(f"scrit run → {directory.resolve()}  (versions: {cfg.run.versions}, "
                  f"validator: {'on' if cfg.validator.enabled else 'off'})")
    try:
        with RunDisplay(console, cfg.run.versions) as display:
            summary = SelfPlayRun(cfg, directory, resume=resume, on_event=display.event).run()
    except (RunDirError, ValueError, FileNotFoundError) as error:
        _fail(str(error))
    if not summary:
        _fail("the run stopped before it started")
    if summary["status"] == "failed":
        error = summary["error"]
        typer.echo(f"error: the run failed in {error['component']}: {error['message']} "
                   f"(traceback: {directory / 'run.log'}; summary: {directory / 'summary.json'})", err=True)
        raise typer.Exit(code=1)
    console.print(f"{summary['status']}: {summary['versions']} versions in {summary['wall_seconds']:.0f} s; "
                  f"final model {summary['final_model']}; report {directory / 'report.md'}")
    if summary["status"] == "interrupted":
        raise typer.Exit(code=130)


@app.command("serve")
def serve_command(
    model: Optional[str] = typer.Option(None, help="'seed' or a checkpoint directory (default: critic.model; "
                                                   "with --follow, the run's newest version)"),
    follow: Optional[Path] = typer.Option(None, "--follow", help="run directory to follow: hot-swap to every "
                                                                  "version it publishes (running or finished run)"),
    host: Optional[str] = typer.Option(None, help="bind address (default: serve.host)"),
    port: Optional[int] = typer.Option(None, help="HTTP port (default: serve.port)"),
    replicas: Optional[int] = typer.Option(None, help="Serve replicas (default: resources.serve_replicas)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="require 'Authorization: Bearer KEY' "
                                                                   "(default: serve.api_key, then $SCRIT_API_KEY)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (serve.*, resources.*, critic.*)"),
    overrides: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set serve.max_batch_size=16"),
) -> None:
    """Serve the critic over HTTP with Ray Serve until Ctrl-C (/v1/critique, OpenAI-compatible /v1/chat/completions)."""
    from scrit.config import ConfigError, load_config
    from scrit.rundir import stop_signals_interrupt

    try:
        cfg = load_config(config, overrides)
    except ConfigError as error:
        _fail(str(error))
    if follow is not None and not follow.is_dir():
        _fail(f"--follow {follow}: no such run directory")
    if replicas is not None and replicas < 1:
        _fail("--replicas must be >= 1")
    if model is not None and model != "seed" and not model.startswith(("http://", "https://")) \
            and not Path(model).is_dir():
        _fail(f"--model {model}: no such model directory")
    import httpx
    import ray

    from scrit.serve.app import start_critic_endpoint, stop_critic_endpoint

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False)

    # SIGINT too: a shell that starts a command in the background makes it ignore SIGINT by default.
    stop_signals_interrupt()
    try:
        url = start_critic_endpoint(cfg, model, follow, host=host, port=port, replicas=replicas, api_key=api_key)
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        following = f", following {follow.resolve()}" if follow is not None else ""
        typer.echo(f"critic endpoint: {url}  (version {health.get('critic_version')}{following}; "
                   f"auth {'on' if api_key or cfg.serve.resolved_api_key() else 'off'}); Ctrl-C to stop", err=True)
        print(url, flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        typer.echo("stopping the critic endpoint", err=True)
    except Exception as error:  # noqa: BLE001 - a deployment that fails to start: say why, clean up
        _fail(f"{type(error).__name__}: {error}")
    finally:
        stop_critic_endpoint()
        if started_ray:
            ray.shutdown()


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
