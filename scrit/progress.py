"""The live display of ``scrit run`` (rich): what every stage is doing while a run goes.

It is fed the driver's events (``SelfPlayRun(on_event=...)``): a bar of published versions, and a
line of stage counts, kept examples, validation pass rate, generated tokens per second, the replay
buffer and the batches in flight, refreshed as each batch reaches the buffer. Evaluations, the
endpoint and failures are printed above it as they happen.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

__all__ = ["RunDisplay"]


class RunDisplay:
    """``with RunDisplay(console, versions) as display: SelfPlayRun(..., on_event=display.event)``."""

    def __init__(self, console: Console, versions: int) -> None:
        self.console = console
        self.started = time.time()
        self.tokens = 0
        self.producing_since: float | None = None  # when the first batch entered the pipeline
        self.progress = Progress(TextColumn("[bold]critic versions[/]"), BarColumn(bar_width=30),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console)
        self.task = self.progress.add_task("versions", total=versions)
        self.status = Text("starting the actors, the trainer and the endpoint ...")
        self.live = Live(Group(self.progress, self.status), console=console, refresh_per_second=2)

    def __enter__(self) -> "RunDisplay":
        self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.stop()
        if not self.console.is_terminal:
            self.console.line()  # a log file gets the last status, then what follows on its own line

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "version":
            self.progress.update(self.task, completed=event["version"])
        elif kind == "batch":
            self.tokens += int(event.get("tokens", 0))
            totals = event.get("totals", {})
            rate = event.get("pass_rate")
            if self.producing_since is None:
                self.producing_since = time.time() - float(event.get("latency_s", 0.0))
            elapsed = max(1.0, time.time() - self.producing_since)
            self.status.plain = (
                f"batches {event.get('batch_id', 0) + 1} (+{event.get('in_flight', 0)} in flight) | solved "
                f"{totals.get('solutions_correct', 0)}/{totals.get('solutions', 0)} | critiques "
                f"{totals.get('critiques', 0)} | kept {totals.get('kept', 0)} (pass {'-' if rate is None else f'{rate:.2f}'})"
                f" | {self.tokens / elapsed:,.0f} tok/s | buffer {event.get('buffer_size', 0)}")
        elif kind == "eval":
            hard = event.get("hard") or {}
            harder = (f"; 6-8 ops: EI-F1 {hard.get('ei_f1') or 0:.3f} CC-Acc {hard.get('cc_acc') or 0:.3f} "
                      f"(n={hard.get('n')})") if hard else ""
            self.console.print(f"[bold green]eval[/] version {event['version']}: EI-F1 {event.get('ei_f1') or 0:.3f} "
                               f"CC-Acc {event.get('cc_acc') or 0:.3f} acc_err {event.get('acc_err') or 0:.3f} "
                               f"acc_cor {event.get('acc_cor') or 0:.3f} (n={event.get('n')}){harder}")
        elif kind == "endpoint":
            self.console.print(f"[bold]critic endpoint[/] {event['url']}  (POST /v1/critique, /v1/chat/completions; "
                               "it follows every new version)")
        elif kind == "endpoint_error":
            self.console.print(f"[bold red]critic endpoint not started[/]: {event['error']} (the run goes on)")
        elif kind == "retry":
            self.console.print(f"[bold yellow]batch {event['batch_id']} sent again in {event.get('wait_s', 0):g} s[/] "
                               f"({event['component']} died: {event['error']})")
        elif kind == "node_lost":
            self.console.print(f"[bold yellow]node {event['node']} lost[/]: its actors restart on the nodes left")
        elif kind == "eval_retry":
            self.console.print(f"[bold yellow]evaluation of version {event['version']} asked again[/] ({event['error']})")
        elif kind == "trainer_restart":
            self.console.print(f"[bold yellow]training starts again[/] (Ray Train's controller failed: {event['error']})")
        elif kind == "buffer_repaired":
            self.console.print(f"[bold yellow]replay buffer[/]: a torn tail of {event['torn_bytes']} bytes was cut "
                               f"off and kept in {event['kept_aside']}; {event['examples']} examples loaded")
        elif kind == "serving":
            self.console.print(f"run finished; still serving the final critic at {event['url']} (Ctrl-C to stop)")
