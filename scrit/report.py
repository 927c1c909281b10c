"""The end-of-run report: ``report.md`` with PNG plots drawn from ``metrics.jsonl``.

``metrics.jsonl`` holds one JSON object per event, each with ``kind`` and ``t`` (seconds since the
run started): ``batch`` (one pass of the self-play pipeline: pass rate, buffer size) and ``eval``
(held-out scores of one version); the trainer writes its loss per version to ``train_metrics.jsonl``.
The report also shows what the critic trained on: the kept examples' error kinds per solver (arith),
read from the buffer log, so a user sees whether the data covers the mistakes the held-out set has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scrit.rundir import read_events


def kept_error_kinds(run_dir: str | Path) -> dict[str, dict[str, int]]:
    """Per solver, the kept examples by the student's error kind: ``none`` (a correct solution) or
    ``result`` / ``operand`` / ``operation`` / ``number`` / ``other`` (``scrit.domains.arith.error_kind``).

    Arith only (other domains have no step structure to classify); a report, never loop input.
    """
    from scrit.rundir import buffer_log_path
    from scrit.domains import arith
    from scrit.messages import TrainingExample
    from scrit.replay_log import RecordLog

    path = buffer_log_path(run_dir)
    if not path.is_file():
        return {}
    mix: dict[str, dict[str, int]] = {}
    for example in RecordLog(path, expected=TrainingExample, readonly=True).read_all():
        try:
            problem = arith.parse_problem(example.prompt.split("Problem: ", 1)[1].split("\n", 1)[0])
        except (IndexError, ValueError):
            continue
        student = example.prompt.split("Student:\n", 1)[-1]
        kind = arith.error_kind(problem, arith.split_steps(student))
        counts = mix.setdefault(example.solver or "unknown", {})
        counts[kind] = counts.get(kind, 0) + 1
    return mix


def _plot(path: Path, title: str, xlabel: str, series: dict[str, tuple[list[float], list[float]]],
          ylabel: str = "", marker: str = "o") -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {name: xy for name, xy in series.items() if xy[0]}
    if not series:
        return False
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in series.items():
        axes.plot(xs, ys, marker=marker, label=name)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write plots and ``report.md`` into ``run_dir``; returns the report path."""
    run_dir = Path(run_dir)
    events = read_events(run_dir / "metrics.jsonl")
    evals = sorted((e for e in events if e.get("kind") == "eval"), key=lambda e: e["version"])
    batches = [e for e in events if e.get("kind") == "batch"]
    train = read_events(run_dir / "train_metrics.jsonl")
    plots = []
    curves = {key: ([e["version"] for e in evals if e.get(key) is not None],
                    [e[key] for e in evals if e.get(key) is not None]) for key in ("ei_f1", "cc_acc", "acc_cor")}
    for key in ("ei_f1", "cc_acc", "acc_cor"):
        hard = [(e["version"], e["hard"][key]) for e in evals if (e.get("hard") or {}).get(key) is not None]
        if hard:
            curves[f"{key} (6-8 ops)"] = ([v for v, _ in hard], [x for _, x in hard])
    if _plot(run_dir / "heldout_scores.png", "Held-out critique scores per critic version", "critic version", curves):
        plots.append(("Held-out scores per version", "heldout_scores.png"))
    if _plot(run_dir / "pass_rate.png", "Validation pass rate", "seconds",
             {"pass rate": ([e["t"] for e in batches if e.get("pass_rate") is not None],
                            [e["pass_rate"] for e in batches if e.get("pass_rate") is not None])}):
        plots.append(("Validation pass rate", "pass_rate.png"))
    if _plot(run_dir / "buffer_size.png", "Replay buffer size", "seconds",
             {"examples": ([e["t"] for e in batches], [e.get("buffer_size", 0) for e in batches])}):
        plots.append(("Replay buffer size", "buffer_size.png"))
    if _plot(run_dir / "train_loss.png", "Trainer loss", "optimizer step",
             {"loss": ([e["step"] for e in train], [e["loss"] for e in train])}, marker=""):
        plots.append(("Trainer loss", "train_loss.png"))

    lines = [f"# scrit run report: {summary.get('run_name', run_dir.name)}", ""]
    error = summary.get("error")
    lines += [f"- status: **{summary.get('status', 'completed')}**"
              + (f" (in {error['component']}: {error['message']}; traceback in run.log)" if error else ""),
              f"- versions published: {summary.get('versions')}",
              f"- seed model: `{summary.get('seed_model')}`",
              f"- final model: `{summary.get('final_model')}`",
              f"- wall time: {summary.get('wall_seconds', 0):.0f} s",
              f"- validator: {'on' if summary.get('validator_enabled') else 'off'}"
              f" (answer match required: {summary.get('require_answer_match')})",
              f"- restarts: {summary.get('restarts') or 'none'}; batches sent again: {summary.get('batch_retries', 0)}",
              ""]
    if evals:
        lines += ["## Held-out evaluation (direct critique, problems never trained on)", "",
                  "In-run sets are small (a trend); score a version with `scrit eval --bench arith` / `arith-hard`.", "",
                  "| version | n | EI-F1 | EI-F1 (SCRIT) | CC-Acc | acc_err | acc_cor | parse rate "
                  "| 6-8 ops: n | EI-F1 | CC-Acc | acc_cor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def cells(scores: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
            return [f"{scores[k]:.3f}" if isinstance(scores.get(k), (int, float)) else "-" for k in keys]

        for e in evals:
            hard = e.get("hard") or {}
            row = [str(e["version"]), str(e.get("n", "-")),
                   *cells(e, ("ei_f1", "ei_f1_scrit", "cc_acc", "acc_err", "acc_cor", "parse_rate")),
                   str(hard.get("n", "-")), *cells(hard, ("ei_f1", "cc_acc", "acc_cor"))]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    published = [e for e in train if "version" in e]
    if published:  # steps per version can shrink to fit the wall budget (train.fit_wall_budget)
        lines += ["## Training per version", "",
                  "| version | optimizer step | steps in it | loss | learning rate at the end | tokens/s | seconds |",
                  "|---|---|---|---|---|---|---|"]
        previous = published[0]["step"] - int(published[0].get("steps_per_version") or published[0]["step"])
        for e in published:
            lines.append(f"| {e['version']} | {e['step']} | {e['step'] - previous} | {e.get('loss', 0):.4f} "
                         f"| {e.get('lr', 0):.2e} | {e.get('tokens_per_s', 0):.0f} | {e.get('wall_s', 0):.0f} |")
            previous = e["step"]
        lines.append("")
    mix = summary.get("kept_error_kinds") or {}
    if mix:
        kinds = ["none", "result", "operand", "operation", "number", "other"]
        lines += ["## What the critic trained on: kept examples by the student's error", "",
                  "`none` = a correct student solution; the others are the kinds of its first wrong step.", "",
                  "| solver | " + " | ".join(kinds) + " | total |", "|---" * (len(kinds) + 2) + "|"]
        for solver, counts in sorted(mix.items()):
            lines.append(f"| {solver} | " + " | ".join(str(counts.get(k, 0)) for k in kinds)
                         + f" | {sum(counts.values())} |")
        lines.append("")
    lines += _placement_lines(summary)
    for title, file in plots:
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def _placement_lines(summary: dict[str, Any]) -> list[str]:
    """Where each component ran (node: IP/node id) and every restart with its reason."""
    placement = summary.get("placement") or {}
    if not placement:
        return []
    lost = [name for name, node in (summary.get("nodes") or {}).items() if not node.get("alive")]
    lines = ["## Where it ran", "", f"Nodes: {len(summary.get('nodes') or {})}"
             + (f", lost: {', '.join(lost)}" if lost else "") + ".", "",
             "| component | node (now) |", "|---|---|"]
    lines += [f"| {component} | {node} |" for component, node in sorted(placement.items())]
    restarts = summary.get("restart_log") or []
    if restarts:
        lines += ["", "| restart | at (s) | reason | from node | to node |", "|---|---|---|---|---|"]
        lines += [f"| {r['component']} | {r['t']} | {r['reason']} | {r['from_node']} | {r['to_node']} |" for r in restarts]
    return [*lines, ""]
