"""Memory of a whole ``scrit run``: peak summed PSS of every process it starts, side by side.

    .venv/bin/python benchmarks/memory.py [--baseline REF] [--set KEY=VALUE ...] [--label NAME]

Runs ``scrit run`` (the built-in default unless ``--set`` / ``--config`` change it) in its own
session and samples, every ``--interval`` seconds, ``/proc/PID/smaps_rollup`` of every process of that
session and of the run's process tree (the driver, Ray's GCS/raylet/agents, every actor, Ray Train's
controller and workers, Serve's controller, proxy and replicas). PSS (proportional set size) charges
a shared page to each of its n users by 1/n, so the sum over processes is what the run really
occupies; RSS would count torch's shared libraries once per process.

With ``--baseline REF`` the same command runs first on the code of git ``REF`` (a temporary
worktree put first on ``PYTHONPATH``, same interpreter and packages; ``scrit/__init__.py`` maps the
top-level ``actors``/``train``/``serve`` folders as an install does), then on this checkout, and one
table prints both: peak summed PSS, the peak's biggest process kinds, versions published, validated
examples per minute (first to last batch report) and wall time. The two runs are sequential on the
same machine, so their ratio is fair; absolute throughput moves with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sample:
    time: float
    total_kib: int
    by_kind: Counter = field(default_factory=Counter)
    cpu_s: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (kind, CPU seconds so far)


def _pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, float] | None:
    """(parent pid, session id, CPU seconds used) of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[1]), int(fields[3]), (int(fields[11]) + int(fields[12])) / _TICKS


def _kind(pid: int) -> str:
    """A short name for what the process is: ``ray::CriticActor``, ``raylet``, ``scrit run``, ..."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in raw if a]
    if not args:
        return "?"
    line = " ".join(args)
    if line.startswith("ray::"):
        return re.split(r"[.(\s]", line, maxsplit=1)[0].removesuffix(":")
    name = Path(args[0]).name
    if name.startswith("python"):
        for arg in args[1:]:
            if arg.endswith(".py"):
                return Path(arg).name
            if arg in ("run", "serve") and "scrit" in line:
                return f"scrit {arg}"
        return "python"
    return name


def _run_processes(root: int, session: int) -> list[int]:
    """``root``'s session plus its descendants (a process that left the session is still found)."""
    parents: dict[int, int] = {}
    members = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        info = _stat(int(entry))
        if info is None:
            continue
        parents[int(entry)] = info[0]
        if info[1] == session:
            members.add(int(entry))
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    stack = [root]
    while stack:
        pid = stack.pop()
        members.add(pid)
        stack.extend(children.get(pid, []))
    return sorted(members)


def sample(root: int, session: int) -> Sample:
    out = Sample(time.time(), 0)
    for pid in _run_processes(root, session):
        pss = _pss_kib(pid)
        if pss:
            kind = _kind(pid)
            out.total_kib += pss
            out.by_kind[kind] += pss
            info = _stat(pid)
            if info is not None:
                out.cpu_s[pid] = (kind, info[2])
    return out


def cpu_by_kind(samples: list[Sample]) -> Counter:
    """CPU seconds each kind of process used over the run (the last reading of every pid seen)."""
    last: dict[int, tuple[str, float]] = {}
    for item in samples:
        last.update(item.cpu_s)
    out: Counter = Counter()
    for kind, seconds in last.values():
        out[kind] += seconds
    return out


def run_once(label: str, python_path: str | None, args: argparse.Namespace) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"scrit-mem-{label}-")) / "run"
    command = [str(ROOT / ".venv" / "bin" / "scrit"), "run", "--run-dir", str(run_dir)]
    if args.config:
        command += ["--config", args.config]
    for item in args.set:
        command += ["--set", item]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["RAY_ADDRESS"] = "local"  # its own Ray: an empty address would join any Ray already running here
    if python_path:
        env["PYTHONPATH"] = python_path + os.pathsep + env.get("PYTHONPATH", "")
    log_path = run_dir.parent / "scrit-run.log"
    print(f"[{label}] {' '.join(command)}  (log {log_path})", flush=True)
    started = time.time()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=python_path or ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    samples: list[Sample] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.append(sample(process.pid, process.pid))
            stop.wait(args.interval)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        rc = process.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)
        rc = process.wait(timeout=180)
    stop.set()
    thread.join()
    wall = time.time() - started
    with _suppress():  # Ray processes the run left behind (it should leave none) are not ours to keep
        os.killpg(process.pid, signal.SIGKILL)
    peak = max(samples, key=lambda s: s.total_kib) if samples else Sample(0, 0)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    batches = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if '"kind": "batch"' in line] if (run_dir / "metrics.jsonl").is_file() else []
    validated = sum(b.get("validated", 0) for b in batches)
    span = (batches[-1]["t"] - batches[0]["t"]) if len(batches) > 1 else 0.0
    return {
        "label": label, "rc": rc, "wall_s": wall, "status": summary.get("status"),
        "versions": summary.get("versions"), "peak_gib": peak.total_kib / 2**20,
        "peak_at_s": peak.time - started if samples else None, "top": peak.by_kind.most_common(40),
        "cpu": cpu_by_kind(samples).most_common(40),
        "validated": validated, "validated_per_min": 60 * validated / span if span > 0 else 0.0,
        "evals": [(e.get("version"), e.get("ei_f1"), e.get("cc_acc")) for e in summary.get("evals", [])],
        "run_dir": str(run_dir),
    }


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _worktree(ref: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="scrit-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], check=True,
                   stdout=subprocess.DEVNULL)
    return path


def report(results: list[dict]) -> None:
    print()
    print(f"{'':34}" + "".join(f"{r['label']:>22}" for r in results))
    rows = [
        ("peak summed PSS (GiB)", lambda r: f"{r['peak_gib']:.2f}"),
        ("  reached at (s)", lambda r: f"{r['peak_at_s']:.0f}" if r["peak_at_s"] is not None else "-"),
        ("versions published", lambda r: str(r["versions"])),
        ("validated examples / min", lambda r: f"{r['validated_per_min']:.0f}"),
        ("validated examples", lambda r: str(r["validated"])),
        ("wall (s)", lambda r: f"{r['wall_s']:.0f}"),
        ("status (exit code)", lambda r: f"{r['status']} ({r['rc']})"),
    ]
    for name, cell in rows:
        print(f"{name:34}" + "".join(f"{cell(r):>22}" for r in results))
    if len(results) == 2 and results[0]["peak_gib"] > 0:
        before, after = results
        print(f"\npeak PSS after / before: {after['peak_gib']:.2f} / {before['peak_gib']:.2f} GiB = "
              f"{after['peak_gib'] / before['peak_gib']:.2f}x")
    for r in results:
        print(f"\n[{r['label']}] biggest at the peak (GiB): "
              + ", ".join(f"{kind} {kib / 2**20:.2f}" for kind, kib in r["top"]))
        print(f"[{r['label']}] CPU seconds by process kind: "
              + ", ".join(f"{kind} {seconds:.0f}" for kind, seconds in r["cpu"]))
        print(f"[{r['label']}] held-out evals (version, EI-F1, CC-Acc): {r['evals']}")
        print(f"[{r['label']}] run directory: {r['run_dir']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="git ref to measure first, side by side with this checkout")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], help="config override for both runs")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=1500.0, help="stop a run (SIGINT) after this long")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--baseline-only", action="store_true", help="measure only --baseline")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = []
    if args.baseline:
        tree = _worktree(args.baseline)
        try:
            results.append(run_once(args.baseline, str(tree), args))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
            shutil.rmtree(tree, ignore_errors=True)
    if not args.baseline_only:
        results.append(run_once(args.label, None, args))
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
