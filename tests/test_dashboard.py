"""The Grafana dashboard is valid JSON, has unique panel ids, and queries only metrics the code defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scrit import telemetry

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "scrit-dashboard.json"

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}


def metric_names_in(promql: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers that are not functions, keywords, label
    names, grouping labels, durations, strings or Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', promql)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range / subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # $__rate_interval, ${var}
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_parser_finds_metric_names():
    expr = ('histogram_quantile(0.99, sum by (le, role) (rate(scrit_swap_latency_seconds_bucket{run=~"$run",'
            'role!="x"}[10m]))) / on(run) group_left scrit_trainer_workers offset 5m > bool 2 * foo_bar')
    assert metric_names_in(expr) == {"scrit_swap_latency_seconds_bucket", "scrit_trainer_workers", "foo_bar"}
    assert metric_names_in('max by (version) (scrit_eval_ei_f1{run=~"$run"})') == {"scrit_eval_ei_f1"}


def test_dashboard_is_valid_with_unique_panel_ids(dashboard):
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert all(isinstance(i, int) for i in ids)
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no queries"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for key in ("x", "y", "w", "h"):
            assert isinstance(panel["gridPos"][key], int)
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_every_query_names_only_defined_metrics(dashboard):
    known = telemetry.exported_series_names()
    used = set()
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            names = metric_names_in(target["expr"])
            assert names, f"{panel['title']!r}: no metric in {target['expr']!r}"
            unknown = names - known
            assert not unknown, f"{panel['title']!r} queries undefined metrics {sorted(unknown)}"
            used |= names
    for variable in dashboard["templating"]["list"]:
        for name in re.findall(r"label_values\((\w+)", json.dumps(variable.get("query", ""))):
            assert name in known
    # The dashboard covers each stage the issue asks for.
    for name in ("scrit_pipeline_items_total", "scrit_validation_pass_rate", "scrit_buffer_size",
                 "scrit_buffer_balance", "scrit_buffer_staleness_mean", "scrit_trainer_loss",
                 "scrit_trainer_tokens_per_second", "scrit_critic_version", "scrit_swap_latency_seconds_bucket",
                 "scrit_endpoint_requests_total", "scrit_endpoint_request_seconds_bucket",
                 "scrit_endpoint_errors_total", "scrit_eval_ei_f1", "scrit_eval_cc_acc"):
        assert name in used, f"no panel shows {name}"


def test_queries_parse_in_prometheus(dashboard, tmp_path):
    """Every query is valid PromQL (checked by promtool, when installed, as recording rules)."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    rules = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$run", ".*")
            rules.append({"record": f"scrit:check:{panel['id']}_{target['refId']}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
