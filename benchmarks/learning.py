"""What a run learns, measured on held-out data: every published version scored, as a scaling curve.

    .venv/bin/python benchmarks/learning.py run  --label default-s1 [--set KEY=VALUE ...] [--taskset 0]
    .venv/bin/python benchmarks/learning.py run  --label long-s0 --config configs/long.yaml --every 2
    .venv/bin/python benchmarks/learning.py eval --run-dir RUN_DIR --label NAME
    .venv/bin/python benchmarks/learning.py mix  --run-dir RUN_DIR --shares 0,0.3,0.5
    .venv/bin/python benchmarks/learning.py plot [RESULTS.jsonl ...] [--labels A,B] --out docs/learning_curve.png

* ``run``: ``scrit run`` (the built-in default or ``--config``, plus ``--set`` overrides) in a subprocess, optionally
  confined to fewer CPUs (``--taskset 0``: core 0 only, a machine half as fast) or beside a CPU hog
  (``--hog``), then ``eval`` of its run directory.
* ``eval``: every published version (and the seed, version 0) scored by ``scrit eval`` in direct mode on
  the project's held-out sets, ``--items`` problems like the loop's (``--bench arith``) and
  ``--hard-items`` longer ones (``--bench arith-hard``, 6-8 operations), with the examples each version
  was trained on (optimizer steps x examples per step, from ``registry.jsonl``); ``--every K`` scores every
  K-th version and the final one (a long run's curve at a fraction of the cost). Two evaluations
  run at once (one vLLM engine each, one per core). One JSON line per run is appended to
  ``--results`` (default ``benchmarks/results/learning.jsonl``, not committed).
* ``mix``: ``train.seed_share`` after the fact: the run's final trained weights mixed with the seed's at
  each of ``--shares``, each mix scored like a version (printed, not appended).
* ``plot``: EI-F1 and CC-Acc against examples trained on, one line per run and set (matplotlib).

No number here comes from inside the loop: the held-out problems are in a hash bucket no training
example uses (``scrit.domains.arith.arith_split``), and the scores are the project's EI-F1 / CC-Acc.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIT = ROOT / ".venv" / "bin" / "scrit"
RESULTS = ROOT / "benchmarks" / "results" / "learning.jsonl"


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["RAY_ADDRESS"] = "local"  # its own Ray: an empty address would join any Ray already running here
    return env


def score(model: str, bench: str, items: int) -> dict[str, Any]:
    """``scrit eval --json`` of one model on one held-out set (vLLM engine, one thread, float32: the scores
    every earlier pass measured, on any CPU)."""
    command = [str(SCRIT), "eval", "--model", model, "--bench", bench, "--mode", "direct", "--limit", str(items),
               "--backend", "vllm", "--dtype", "float32", "--batch-size", "128", "--json"]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["average"]


def evaluate_run(run_dir: Path, items: int, hard_items: int, ends_only: bool = False,
                 every: int = 1) -> list[dict[str, Any]]:
    """Every version of ``run_dir`` (0 = the seed) on both held-out sets, with examples trained on
    (``ends_only``: the seed and the final version, a third of the time for a quick comparison;
    ``every``: the seed, every ``every``-th version and the final one)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    registry = [json.loads(line) for line in (run_dir / "versions" / "registry.jsonl").read_text().splitlines()
                if line.strip()] if (run_dir / "versions" / "registry.jsonl").is_file() else []
    train = summary["config"]["train"]
    per_step = int(train["batch_size"]) * int(train["grad_accum"])
    models = [(0, summary["seed_model"], 0)] + [(v["version"], v["uri"], v["step"] * per_step) for v in registry]
    if ends_only:
        models = [models[0], models[-1]] if len(models) > 1 else models
    else:  # the in-run evaluator's rule (run.eval_every), with the last published version as the last planned
        from scrit.evaluate import eval_due

        models = [model for model in models if eval_due(model[0], every, models[-1][0])]
    scores = score_models([uri for _, uri, _ in models], items, hard_items)
    return [{"version": version, "model": uri, "examples": examples, **scores[uri]}
            for version, uri, examples in models]


def score_models(paths: list[str], items: int, hard_items: int) -> dict[str, dict[str, Any]]:
    """Each model on both held-out sets: ``{path: {"arith": scores, "arith-hard": scores}}``."""
    jobs = [(path, bench, n) for path in paths for bench, n in (("arith", items), ("arith-hard", hard_items)) if n > 0]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # two engines, one per core
        averages = list(pool.map(lambda job: score(*job), jobs))
    scores: dict[str, dict[str, Any]] = {path: {} for path in paths}
    for (path, bench, _), average in zip(jobs, averages):
        scores[path][bench] = {k: average.get(k) for k in ("n", "ei_f1", "cc_acc", "acc_err", "acc_cor", "ei_f1_scrit")}
    return scores


def mix_and_score(run_dir: Path, shares: list[float], items: int, hard_items: int) -> list[dict[str, Any]]:
    """``train.seed_share`` after the fact: the run's final trained weights (``trained/`` where the run
    published mixes, else its final version) mixed with the seed's at each share, each scored like a
    version. Shows what a share would have given without running the loop again."""
    import torch
    from transformers import AutoModelForCausalLM

    from scrit.checkpoints import read_registry, trained_weights_path
    from scrit.train.trainer import _resume_trained_weights
    from scrit.weights import mix_with_seed

    summary = json.loads((run_dir / "summary.json").read_text())
    final = read_registry(run_dir)[-1]
    model = AutoModelForCausalLM.from_pretrained(final.uri, dtype=torch.float32, local_files_only=True)
    own = trained_weights_path(run_dir, final.version)
    if not own.is_file() and float(summary["config"]["train"].get("seed_share", 0.0)) > 0:
        raise SystemExit(f"{own} is missing: version {final.version} is a mix and the trainer's own weights are gone")
    _resume_trained_weights(model, str(run_dir), final.version)  # the trainer's loader: a torn file names itself
    trained = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    seed = AutoModelForCausalLM.from_pretrained(summary["seed_model"], dtype=torch.float32,
                                                local_files_only=True).state_dict()
    out = Path(tempfile.mkdtemp(prefix="scrit-mix-"))
    paths = []
    for share in shares:
        path = out / f"share-{share:g}"
        shutil.copytree(final.uri, path)  # tokenizer and the rest; the weights are overwritten below
        model.load_state_dict(mix_with_seed(trained, seed, share))
        model.save_pretrained(str(path))
        paths.append(str(path))
    scores = score_models(paths, items, hard_items)
    return [{"seed_share": share, "model": path, **scores[path]} for share, path in zip(shares, paths)]


def run_and_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"scrit-learning-{args.label}-")) / "run"
    command = [str(SCRIT), "run", "--run-dir", str(run_dir)]
    if args.config:
        command += ["--config", str(args.config)]
    for item in args.set:
        command += ["--set", item]
    if args.taskset:
        command = ["taskset", "-c", args.taskset, *command]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
    started = time.time()
    try:
        result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=args.timeout)
    finally:
        if hog is not None:
            hog.kill()
    wall = time.time() - started
    (run_dir.parent / "scrit-run.log").write_text(result.stdout + result.stderr)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    record = {"label": args.label, "config": str(args.config) if args.config else None, "overrides": args.set,
              "taskset": args.taskset, "hog": args.hog,
              "run_dir": str(run_dir), "rc": result.returncode, "status": summary.get("status"),
              "wall_s": round(wall, 1), "versions": summary.get("versions"), "counts": summary.get("counts"),
              "curve": evaluate_run(run_dir, args.items, args.hard_items, args.ends_only, args.every)
              if summary else []}
    _append(args.results, record)
    _print(record)
    return record


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _print(record: dict[str, Any]) -> None:
    print(f"[{record['label']}] {record.get('status')} rc={record.get('rc')} versions={record.get('versions')} "
          f"wall={record.get('wall_s')} s  run: {record.get('run_dir')}")
    seed = record["curve"][0] if record["curve"] else None
    for row in record["curve"]:
        cells = []
        for bench in ("arith", "arith-hard"):
            scores = row.get(bench)
            if not scores:
                continue
            base = seed[bench] if seed else scores
            rel = lambda key: (scores[key] / base[key] - 1) * 100 if base.get(key) else 0.0  # noqa: E731
            cells.append(f"{bench}: EI-F1 {scores['ei_f1']:.3f} ({rel('ei_f1'):+.0f} %) CC-Acc {scores['cc_acc']:.3f} "
                         f"({rel('cc_acc'):+.0f} %) acc_cor {scores['acc_cor']:.3f}")
        print(f"  v{row['version']} ({row['examples']} examples): " + " | ".join(cells))


def plot(paths: list[Path], out: Path, labels: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    if labels:  # the runs asked for, in that order (the last record of a label wins)
        by_label = {record["label"]: record for record in records}
        missing = [label for label in labels if label not in by_label]
        if missing:
            raise SystemExit(f"no run labelled {', '.join(missing)} in {', '.join(map(str, paths))}")
        records = [by_label[label] for label in labels]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, title in ((axes[0], "ei_f1", "EI-F1 (direct)"), (axes[1], "cc_acc", "CC-Acc (direct)")):
        for index, record in enumerate(records):  # one colour per run; solid 2-5 ops, dashed 6-8 ops
            for bench, style in (("arith", "-o"), ("arith-hard", "--s")):
                points = [(row["examples"], row[bench][key]) for row in record["curve"] if row.get(bench)]
                if points:
                    axis.plot(*zip(*points), style, label=f"{record['label']} ({'6-8 ops' if bench != 'arith' else '2-5 ops'})",
                              markersize=4, color=plt.cm.tab10(index % 10))
        axis.set_title(title)
        axis.set_xlabel("examples trained on (optimizer steps x examples per step)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "eval"):
        command = sub.add_parser(name)
        command.add_argument("--label", required=True)
        command.add_argument("--items", type=int, default=300, help="held-out items like the loop's (2-5 ops)")
        command.add_argument("--hard-items", type=int, default=200, help="harder held-out items (6-8 ops)")
        command.add_argument("--results", type=Path, default=RESULTS)
        command.add_argument("--ends-only", action="store_true", help="score only the seed and the final version")
        command.add_argument("--every", type=int, default=1, help="score every K-th version (and the final one)")
    sub.choices["run"].add_argument("--config", type=Path, help="YAML config for scrit run (default: the built-in)")
    sub.choices["run"].add_argument("--set", action="append", default=[], help="config override")
    sub.choices["run"].add_argument("--taskset", help="CPU list for taskset -c (e.g. 0: one core)")
    sub.choices["run"].add_argument("--hog", action="store_true", help="a busy-looping process beside the run")
    sub.choices["run"].add_argument("--timeout", type=float, default=5400)
    sub.choices["eval"].add_argument("--run-dir", type=Path, required=True)
    mixing = sub.add_parser("mix")
    mixing.add_argument("--run-dir", type=Path, required=True)
    mixing.add_argument("--shares", default="0,0.3,0.5", help="comma-separated seed shares to score")
    mixing.add_argument("--items", type=int, default=300)
    mixing.add_argument("--hard-items", type=int, default=150)
    plotting = sub.add_parser("plot")
    plotting.add_argument("paths", nargs="*", type=Path, default=[RESULTS])
    plotting.add_argument("--out", type=Path, default=ROOT / "docs" / "learning_curve.png")
    plotting.add_argument("--labels", help="comma-separated run labels to plot (default: every run)")
    args = parser.parse_args()
    if args.command == "run":
        run_and_evaluate(args)
    elif args.command == "eval":
        record = {"label": args.label, "run_dir": str(args.run_dir),
                  "curve": evaluate_run(args.run_dir, args.items, args.hard_items, args.ends_only, args.every)}
        _append(args.results, record)
        _print(record)
    elif args.command == "mix":
        for row in mix_and_score(args.run_dir, [float(x) for x in args.shares.split(",")], args.items, args.hard_items):
            cells = [f"{bench}: EI-F1 {row[bench]['ei_f1']:.3f} CC-Acc {row[bench]['cc_acc']:.3f} "
                     f"acc_cor {row[bench]['acc_cor']:.3f}" for bench in ("arith", "arith-hard") if bench in row]
            print(f"  seed_share {row['seed_share']:g}: " + " | ".join(cells))
    else:
        plot(args.paths, args.out, args.labels.split(",") if args.labels else None)


if __name__ == "__main__":
    main()
