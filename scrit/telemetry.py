"""Prometheus metrics for every stage of a run (DESIGN.md §10), Ray-free and cheap to import.

Every metric is defined once, in :data:`METRICS` (name, type, help, labels); dashboards and tests
list them with :func:`metric_names`. ``prometheus_client`` is imported only when a process starts
recording, so importing this module costs nothing.

How a process takes part:

* :func:`start_exporter` (``run=`` the run's name) turns recording on in this process, with that
  ``run`` label on every series, and starts one HTTP exporter per process (port 0 = a free port);
  it returns the exporter's URL. Ray actors are separate processes, so each actor that produces
  metrics starts its own exporter and hands its URL to the driver, which lists every URL in
  ``RUN_DIR/prometheus_targets.json`` (Prometheus ``file_sd`` format, :func:`write_targets`).
* The recording helpers (:func:`record_generation`, :func:`set_version`, :func:`observe_swap`,
  :func:`record_event`, :func:`watch_buffer`, :class:`TrainMeter`, :func:`observe_request`) are
  no-ops until :func:`start_exporter` (or :func:`configure`) ran in the process, so unit tests and
  runs with ``metrics.enabled: false`` pay nothing.

Host: an exporter binds to ``$SCRIT_METRICS_HOST`` if set (``0.0.0.0`` = every interface), else to
Ray's node IP when Ray is running in the process, else to ``127.0.0.1``; the URL it returns names an
address Prometheus can reach (the node IP when bound to ``0.0.0.0``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "METRICS",
    "TrainMeter",
    "TARGETS_FILE",
    "configure",
    "count_swap_error",
    "enabled",
    "exported_series_names",
    "exporter_url",
    "metric",
    "metric_names",
    "observe_request",
    "observe_swap",
    "prometheus_config",
    "record_event",
    "record_generation",
    "render",
    "set_version",
    "start_exporter",
    "stop_exporter",
    "urls_from_targets",
    "watch_buffer",
    "write_targets",
]

log = logging.getLogger(__name__)

TARGETS_FILE = "prometheus_targets.json"  # in the run directory
HOST_ENV = "SCRIT_METRICS_HOST"

# Publish -> serving can take from under a second (a hot swap between two batches) to minutes (a
# component busy with a long batch, or a slow checkpoint load on a big model).
SWAP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class MetricSpec(NamedTuple):
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None


_RR = ("run", "role")
# Every metric the project exports. Counter names carry their ``_total`` suffix here (it is the
# name Prometheus stores); histograms also export ``_bucket``, ``_sum`` and ``_count``.
METRICS: dict[str, MetricSpec] = {
    # -- generation, per role (solver, critic, corrector, validator, evaluator, serve) ----------
    "scrit_items_total": MetricSpec(
        "counter", "Outputs generated: solutions, critiques, corrections, validations, evaluation "
        "critiques, endpoint completions.", _RR),
    "scrit_prompt_tokens_total": MetricSpec("counter", "Prompt tokens fed to generation.", _RR),
    "scrit_completion_tokens_total": MetricSpec("counter", "Tokens generated.", _RR),
    "scrit_generation_seconds_total": MetricSpec("counter", "Wall seconds spent inside generate().", _RR),
    "scrit_generation_tokens_per_second": MetricSpec(
        "gauge", "Generated tokens per second in the role's last batch.", _RR),
    # -- versions and hot swap -----------------------------------------------------------------
    "scrit_critic_version": MetricSpec(
        "gauge", "Critic version a component serves (solver, critic, corrector, validator, "
        "evaluator, serve), last published by the trainer (trainer) or latest in the registry "
        "(published).", _RR),
    "scrit_swap_latency_seconds": MetricSpec(
        "histogram", "Seconds from a version's publication (WeightVersion.created_at) to the "
        "component serving it.", _RR, SWAP_BUCKETS),
    "scrit_swaps_total": MetricSpec("counter", "Completed hot swaps to a newer version.", _RR),
    "scrit_swap_errors_total": MetricSpec(
        "counter", "Swaps that failed (bad checkpoint); the component kept its version.", _RR),
    # -- the pipeline (driver) -------------------------------------------------------------------
    "scrit_pipeline_items_total": MetricSpec(
        "counter", "Items through each pipeline stage: problems, solutions, solutions_correct, "
        "critiques, parsed, consistent, validated, kept.", ("run", "stage")),
    "scrit_pipeline_passes_total": MetricSpec("counter", "Pipeline passes completed.", ("run",)),
    "scrit_validation_pass_rate": MetricSpec(
        "gauge", "Share of parsed critiques the validator kept in the last pass.", ("run",)),
    # -- replay buffer ---------------------------------------------------------------------------
    "scrit_buffer_size": MetricSpec("gauge", "Examples held in the replay buffer's memory window.", ("run",)),
    "scrit_buffer_eligible": MetricSpec(
        "gauge", "Examples fresh enough (max_staleness) for the trainer's current version.", ("run",)),
    "scrit_buffer_balance": MetricSpec(
        "gauge", "Share of buffered examples whose student solution was correct (target: "
        "buffer.correct_ratio).", ("run",)),
    "scrit_buffer_staleness_mean": MetricSpec(
        "gauge", "Mean versions between the trainer's version and a buffered example's.", ("run",)),
    "scrit_buffer_staleness_max": MetricSpec(
        "gauge", "Largest versions between the trainer's version and a buffered example's.", ("run",)),
    "scrit_buffer_room": MetricSpec(
        "gauge", "Examples producers may still put before waiting for the trainer (backpressure).", ("run",)),
    # -- trainer (Ray Train, rank 0) -----------------------------------------------------------
    "scrit_trainer_step": MetricSpec("gauge", "Optimizer steps taken.", ("run",)),
    "scrit_trainer_loss": MetricSpec(
        "gauge", "Mean target-token loss of the last optimizer step (rank 0's micro-batches).", ("run",)),
    "scrit_trainer_tokens_per_second": MetricSpec(
        "gauge", "Tokens per compute second in the last optimizer step, per worker (rank 0).", ("run",)),
    "scrit_trainer_tokens_total": MetricSpec("counter", "Tokens trained on by rank 0.", ("run",)),
    "scrit_trainer_workers": MetricSpec("gauge", "Ray Train workers (world size).", ("run",)),
    # -- held-out evaluation (driver) ------------------------------------------------------------
    "scrit_eval_ei_f1": MetricSpec("gauge", "Held-out EI-F1 of a critic version (direct mode; split arith or "
                                   "arith-hard).", ("run", "version", "split")),
    "scrit_eval_cc_acc": MetricSpec("gauge", "Held-out CC-Acc of a critic version (direct mode; split arith or "
                                    "arith-hard).", ("run", "version", "split")),
    # -- the HTTP endpoint (Ray Serve) -----------------------------------------------------------
    "scrit_endpoint_requests_total": MetricSpec(
        "counter", "HTTP requests answered, by route and status code.", ("run", "route", "code")),
    "scrit_endpoint_request_seconds": MetricSpec(
        "histogram", "HTTP request latency in seconds.", ("run", "route"), REQUEST_BUCKETS),
    "scrit_endpoint_errors_total": MetricSpec(
        "counter", "HTTP requests answered with status >= 400.", ("run", "route", "code")),
}

PIPELINE_STAGES = ("problems", "solutions", "solutions_correct", "critiques", "parsed", "consistent", "validated",
                   "kept")


def metric_names() -> list[str]:
    """Every metric name the project exports, as stored by Prometheus (counters end in ``_total``)."""
    return list(METRICS)


def exported_series_names() -> set[str]:
    """Names a PromQL query may use: :func:`metric_names` plus histograms' ``_bucket/_sum/_count``."""
    out = set(METRICS)
    for name, spec in METRICS.items():
        if spec.kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return out


# --------------------------------------------------------------------------------------------------
# Process state

_lock = threading.RLock()
_state: dict[str, Any] = {"run": None, "registry": None, "url": None, "server": None}
_metrics: dict[str, Any] = {}


def configure(run: str) -> None:
    """Turn recording on in this process; ``run`` labels every series. Idempotent; a new name wins."""
    with _lock:
        _state["run"] = str(run)
        _registry()


def enabled() -> bool:
    return _state["run"] is not None


def _registry() -> Any:
    """The process's CollectorRegistry (scrit metrics + process CPU/memory), built on first use."""
    with _lock:
        if _state["registry"] is None:
            from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics

            disable_created_metrics()  # no ``*_created`` series beside every counter and histogram
            registry = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=registry)
            _state["registry"] = registry
        return _state["registry"]


def metric(name: str) -> Any:
    """The prometheus_client object for ``name`` (created in this process's registry on first use)."""
    with _lock:
        found = _metrics.get(name)
        if found is not None:
            return found
        spec = METRICS[name]
        import prometheus_client as pc

        registry = _registry()
        if spec.kind == "counter":
            # prometheus_client appends ``_total`` itself.
            found = pc.Counter(name.removesuffix("_total"), spec.help, spec.labels, registry=registry)
        elif spec.kind == "gauge":
            found = pc.Gauge(name, spec.help, spec.labels, registry=registry)
        elif spec.kind == "histogram":
            found = pc.Histogram(name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)
        else:  # pragma: no cover - METRICS is static
            raise ValueError(f"unknown metric kind {spec.kind!r}")
        _metrics[name] = found
        return found


def _labels(name: str, **labels: Any) -> Any:
    return metric(name).labels(run=_state["run"], **{k: str(v) for k, v in labels.items()})


def render() -> str:
    """This process's metrics in the Prometheus text format (what the exporter serves)."""
    from prometheus_client import generate_latest

    return generate_latest(_registry()).decode()


# --------------------------------------------------------------------------------------------------
# Exporter


def _default_host() -> str:
    """``$SCRIT_METRICS_HOST``, else Ray's node IP when Ray runs in this process, else 127.0.0.1."""
    host = os.environ.get(HOST_ENV, "").strip()
    if host:
        return host
    ray = sys.modules.get("ray")  # never import Ray from here
    if ray is not None:
        try:
            if ray.is_initialized():
                return ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - fall back to loopback
            pass
    return "127.0.0.1"


def _advertised(host: str) -> str:
    if host not in ("0.0.0.0", "::", ""):
        return host
    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            return ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001
            pass
    import socket

    return socket.gethostname()


def start_exporter(port: int = 0, host: str | None = None, run: str | None = None) -> str:
    """Start this process's metrics exporter (once; later calls return the same URL).

    ``run`` (if given) turns recording on with that run label (see :func:`configure`). ``port`` 0
    picks a free port; a port that is taken falls back to a free one with a warning. Returns
    ``http://HOST:PORT/metrics``.
    """
    if run is not None:
        configure(run)
    with _lock:
        if _state["url"] is not None:
            return _state["url"]
        from prometheus_client import start_http_server

        bind = host or _default_host()
        try:
            server, _ = start_http_server(int(port), addr=bind, registry=_registry())
        except OSError as error:
            if not port:
                raise
            log.warning("metrics port %s on %s unavailable (%s); using a free port", port, bind, error)
            server, _ = start_http_server(0, addr=bind, registry=_registry())
        _state["server"] = server
        shown = _advertised(bind)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"  # IPv6 literal
        _state["url"] = f"http://{shown}:{server.server_port}/metrics"
        return _state["url"]


def exporter_url() -> str | None:
    """The URL :func:`start_exporter` returned in this process, or None."""
    return _state["url"]


def stop_exporter() -> None:
    """Stop this process's exporter (tests); recording stays on."""
    with _lock:
        server = _state["server"]
        if server is not None:
            server.shutdown()
            server.server_close()
        _state["server"] = None
        _state["url"] = None


# --------------------------------------------------------------------------------------------------
# Recording helpers (no-ops until the process is configured)


def record_generation(role: str, generations: Sequence[Any], seconds: float) -> None:
    """One generate() batch: items, prompt/completion tokens, time, tokens/s and the version served.

    ``generations`` are ``scrit.backends.base.Generation`` objects (anything with ``prompt_tokens``,
    ``completion_tokens`` and ``version``).
    """
    if not enabled() or not generations:
        return
    completion = sum(int(g.completion_tokens) for g in generations)
    _labels("scrit_items_total", role=role).inc(len(generations))
    _labels("scrit_prompt_tokens_total", role=role).inc(sum(int(g.prompt_tokens) for g in generations))
    _labels("scrit_completion_tokens_total", role=role).inc(completion)
    _labels("scrit_generation_seconds_total", role=role).inc(max(0.0, seconds))
    if seconds > 0:
        _labels("scrit_generation_tokens_per_second", role=role).set(completion / seconds)
    set_version(role, max(int(g.version) for g in generations))


def set_version(role: str, version: int) -> None:
    """The critic version ``role`` now serves (or, for ``trainer``/``published``, has published)."""
    if enabled():
        _labels("scrit_critic_version", role=role).set(int(version))


def observe_swap(role: str, version: Any, now: float | None = None) -> None:
    """``role`` now serves ``version`` (a WeightVersion): swap count, version gauge and the latency
    from its publication (``created_at``). Version 0 (the seed, never published) records no latency.
    Publisher and subscriber clocks are assumed in sync (NTP): skew shows up in this latency."""
    if not enabled():
        return
    _labels("scrit_swaps_total", role=role).inc()
    set_version(role, int(version.version))
    created = float(getattr(version, "created_at", 0.0) or 0.0)
    if int(version.version) > 0 and created > 0:
        latency = max(0.0, (time.time() if now is None else now) - created)
        _labels("scrit_swap_latency_seconds", role=role).observe(latency)


def count_swap_error(role: str) -> None:
    if enabled():
        _labels("scrit_swap_errors_total", role=role).inc()


def record_event(event: Mapping[str, Any]) -> None:
    """The driver's run events (``metrics.jsonl`` lines): ``batch`` -> pipeline counters and pass
    rate; ``version`` -> the published version; ``eval`` -> EI-F1 / CC-Acc for its version, on the
    in-distribution set (split ``arith``) and the harder one (``hard``: split ``arith-hard``)."""
    if not enabled():
        return
    kind = event.get("kind")
    if kind == "batch":
        for stage in PIPELINE_STAGES:
            value = event.get(stage)
            if isinstance(value, (int, float)) and value > 0:
                _labels("scrit_pipeline_items_total", stage=stage).inc(value)
        _labels("scrit_pipeline_passes_total").inc()
        if event.get("pass_rate") is not None:
            _labels("scrit_validation_pass_rate").set(float(event["pass_rate"]))
        if event.get("latest_version") is not None:
            set_version("published", int(event["latest_version"]))
    elif kind == "version" and event.get("version") is not None:  # the driver saw a new published version
        set_version("published", int(event["version"]))
    elif kind == "eval" and event.get("version") is not None:
        version = int(event["version"])
        for split, scores in (("arith", event), ("arith-hard", event.get("hard") or {})):
            for key, name in (("ei_f1", "scrit_eval_ei_f1"), ("cc_acc", "scrit_eval_cc_acc")):
                if scores.get(key) is not None:
                    _labels(name, version=version, split=split).set(float(scores[key]))


_BUFFER_GAUGES = {
    "scrit_buffer_size": "size",
    "scrit_buffer_eligible": "eligible",
    "scrit_buffer_balance": "balance",
    "scrit_buffer_staleness_mean": "staleness_mean",
    "scrit_buffer_staleness_max": "staleness_max",
    "scrit_buffer_room": "room",
}


def watch_buffer(stats: Callable[[], Mapping[str, Any]], max_age_s: float = 0.5) -> None:
    """Buffer gauges read from ``stats()`` (``ReplayBuffer.stats``) when Prometheus scrapes.

    ``stats()`` runs at most once per ``max_age_s`` however many gauges a scrape reads. A missing
    value (``balance`` of an empty buffer) reads as NaN.
    """
    if not enabled():
        return
    cache: dict[str, Any] = {"at": -1e18, "value": {}}
    cache_lock = threading.Lock()

    def read(key: str) -> float:
        with cache_lock:
            if time.monotonic() - cache["at"] > max_age_s:
                cache["value"] = dict(stats())
                cache["at"] = time.monotonic()
            value = cache["value"].get(key)
        return float("nan") if value is None else float(value)

    for name, key in _BUFFER_GAUGES.items():
        _labels(name).set_function(lambda key=key: read(key))


class TrainMeter:
    """Trainer gauges, fed once per optimizer step with the trainer's running window.

    ``window`` holds sums since the last published version (``loss_sum``, ``micro``, ``tokens``,
    ``compute_s``); the meter takes differences between calls, so each step's own loss and
    throughput are reported, and notices when the window was reset.
    """

    _KEYS = ("loss_sum", "micro", "tokens", "compute_s")

    def __init__(self, world_size: int = 1) -> None:
        self.last = dict.fromkeys(self._KEYS, 0.0)
        if enabled():
            _labels("scrit_trainer_workers").set(int(world_size))

    def step(self, step: int, window: Mapping[str, float]) -> None:
        if not enabled():
            return
        now = {key: float(window.get(key, 0.0)) for key in self._KEYS}
        if now["micro"] < self.last["micro"]:  # the window was reset (a version was published)
            self.last = dict.fromkeys(self._KEYS, 0.0)
        delta = {key: now[key] - self.last[key] for key in self._KEYS}
        self.last = now
        _labels("scrit_trainer_step").set(int(step))
        if delta["micro"] > 0:
            _labels("scrit_trainer_loss").set(delta["loss_sum"] / delta["micro"])
        if delta["tokens"] > 0:
            _labels("scrit_trainer_tokens_total").inc(delta["tokens"])
        if delta["compute_s"] > 0:
            _labels("scrit_trainer_tokens_per_second").set(delta["tokens"] / delta["compute_s"])

    def published(self, version: int) -> None:
        set_version("trainer", version)


def observe_request(route: str, code: int, seconds: float) -> None:
    """One HTTP request answered by the endpoint: count by route and status, latency, errors (>= 400)."""
    if not enabled():
        return
    _labels("scrit_endpoint_requests_total", route=route, code=int(code)).inc()
    _labels("scrit_endpoint_request_seconds", route=route).observe(max(0.0, seconds))
    if int(code) >= 400:
        _labels("scrit_endpoint_errors_total", route=route, code=int(code)).inc()


# --------------------------------------------------------------------------------------------------
# Prometheus side: targets file and scrape config


def _hostport(url: str) -> tuple[str, str]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.netloc, parts.path or "/metrics"


def write_targets(path: str | os.PathLike[str], targets: Mapping[str, str | None],
                  labels: Mapping[str, str] | None = None) -> Path:
    """Write ``{component: exporter URL}`` as a Prometheus ``file_sd`` JSON file (atomically).

    Each target group gets ``component`` (and ``labels``) as target labels. Prometheus re-reads the
    file when it changes, so call again whenever a component's exporter comes or goes.
    """
    groups = []
    for component, url in sorted(targets.items()):
        if not url:
            continue
        hostport, metrics_path = _hostport(url)
        group_labels = {"component": component, **(labels or {})}
        if metrics_path != "/metrics":
            group_labels["__metrics_path__"] = metrics_path
        groups.append({"targets": [hostport], "labels": group_labels})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(groups, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def prometheus_config(template: str, run_dir: str | os.PathLike[str], scrape_interval: str | None = None) -> str:
    """``deploy/prometheus.yml`` with ``RUN_DIR`` replaced by ``run_dir`` (absolute) and, if given,
    every ``scrape_interval`` (and ``scrape_timeout``, which may not exceed it) set to
    ``scrape_interval`` (e.g. ``"1s"``)."""
    import re

    text = template.replace("RUN_DIR", str(Path(run_dir).resolve()))
    if scrape_interval is not None:
        text = re.sub(r"^(\s*scrape_(?:interval|timeout):\s*)\S+", rf"\g<1>{scrape_interval}", text, flags=re.M)
    return text


def urls_from_targets(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{component: URL}`` back from a targets file written by :func:`write_targets`."""
    out = {}
    for group in json.loads(Path(path).read_text()):
        labels = group.get("labels", {})
        for target in group.get("targets", []):
            out[labels.get("component", target)] = f"http://{target}{labels.get('__metrics_path__', '/metrics')}"
    return out
