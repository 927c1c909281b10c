"""scrit.telemetry: metric definitions, the per-process exporter, the recording helpers, the targets
file and the scrape-config template. Fast: no Ray, no Prometheus server."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from scrit import telemetry
from scrit.backends.base import Generation
from scrit.messages import WeightVersion

REPO = Path(__file__).resolve().parents[1]
RUN = "unit-test"


def samples(text: str | None = None) -> dict[tuple[str, frozenset], float]:
    """{(name, labels): value} from the exporter's text (default: this process's metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text if text is not None else telemetry.render()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(name: str, **labels: str) -> float | None:
    return samples().get((name, frozenset({"run": RUN, **labels}.items())))


@pytest.fixture(autouse=True)
def configured():
    telemetry.configure(RUN)
    yield


def test_definitions_are_consistent():
    names = telemetry.metric_names()
    assert len(names) == len(set(names)) and len(names) >= 25
    for name, spec in telemetry.METRICS.items():
        assert name.startswith("scrit_") and spec.help and spec.labels[0] == "run", name
        assert name.endswith("_total") == (spec.kind == "counter"), name
        assert spec.kind in ("counter", "gauge", "histogram")
        assert (spec.buckets is not None) == (spec.kind == "histogram")
    series = telemetry.exported_series_names()
    assert "scrit_swap_latency_seconds_bucket" in series and "scrit_items_total" in series
    assert "scrit_items_total_bucket" not in series


def test_import_is_cheap():
    code = "import sys, scrit.telemetry; print('prometheus_client' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_helpers_are_noops_until_configured():
    code = ("import sys\nfrom scrit import telemetry\n"
            "telemetry.set_version('critic', 3)\ntelemetry.observe_request('/x', 200, 0.1)\n"
            "print(telemetry.enabled(), 'prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_exporter_serves_every_defined_metric_once_recorded():
    url = telemetry.start_exporter(run=RUN)
    assert re.fullmatch(r"http://[^/]+:\d+/metrics", url)  # 127.0.0.1, or Ray's node IP if Ray runs here
    assert telemetry.start_exporter() == url == telemetry.exporter_url()  # once per process
    gens = [Generation(text="x", prompt_tokens=10, completion_tokens=4, version=2)] * 3
    telemetry.record_generation("critic", gens, 0.5)
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    got = samples(text)
    assert got[("scrit_items_total", frozenset({"run": RUN, "role": "critic"}.items()))] >= 3
    assert got[("scrit_generation_tokens_per_second", frozenset({"run": RUN, "role": "critic"}.items()))] == 24.0
    assert got[("scrit_critic_version", frozenset({"run": RUN, "role": "critic"}.items()))] == 2
    assert "process_cpu_seconds_total" in text
    assert "_created" not in text  # no *_created series beside counters


def test_generation_counters_add_up():
    before = value("scrit_completion_tokens_total", role="solver") or 0.0
    gens = [Generation(text="ab", prompt_tokens=7, completion_tokens=5, version=0)] * 2
    telemetry.record_generation("solver", gens, 1.0)
    telemetry.record_generation("solver", [], 1.0)  # an empty batch records nothing
    assert value("scrit_completion_tokens_total", role="solver") == before + 10
    assert value("scrit_generation_tokens_per_second", role="solver") == 10.0


def test_swap_latency_from_publication_and_not_for_the_seed():
    count = value("scrit_swap_latency_seconds_count", role="validator") or 0.0
    telemetry.observe_swap("validator", WeightVersion(version=0, uri="seed", checksum="", created_at=1.0))
    assert (value("scrit_swap_latency_seconds_count", role="validator") or 0.0) == count
    now = time.time()
    telemetry.observe_swap("validator", WeightVersion(version=4, uri="v4", checksum="", created_at=now - 3.0), now=now)
    assert value("scrit_swap_latency_seconds_count", role="validator") == count + 1
    assert value("scrit_swap_latency_seconds_bucket", role="validator", le="2.5") == 0
    assert value("scrit_swap_latency_seconds_bucket", role="validator", le="5.0") == count + 1
    assert value("scrit_critic_version", role="validator") == 4
    assert value("scrit_swaps_total", role="validator") >= 2


def test_run_events_feed_pipeline_and_eval_metrics():
    kept = value("scrit_pipeline_items_total", stage="kept") or 0.0
    telemetry.record_event({"kind": "batch", "problems": 16, "solutions": 32, "parsed": 20, "validated": 15,
                            "kept": 15, "critiques": 21, "pass_rate": 0.75, "latest_version": 2})
    telemetry.record_event({"kind": "eval", "version": 2, "ei_f1": 0.4, "cc_acc": 0.5, "n": 16,
                            "hard": {"ei_f1": 0.2, "cc_acc": 0.1, "n": 8}})
    telemetry.record_event({"kind": "stop", "reason": "max_wall_seconds"})  # other kinds are ignored
    assert value("scrit_pipeline_items_total", stage="kept") == kept + 15
    assert value("scrit_validation_pass_rate") == 0.75
    assert value("scrit_critic_version", role="published") == 2
    assert value("scrit_eval_ei_f1", version="2", split="arith") == 0.4
    assert value("scrit_eval_cc_acc", version="2", split="arith") == 0.5
    assert value("scrit_eval_ei_f1", version="2", split="arith-hard") == 0.2
    telemetry.record_event({"kind": "version", "version": 3, "target": 6})  # the driver saw version 3 published
    assert value("scrit_critic_version", role="published") == 3


def test_buffer_gauges_read_the_live_buffer(tmp_path):
    from scrit.actors.replay_buffer import ReplayBuffer
    from scrit.messages import TrainingExample

    buffer = ReplayBuffer(tmp_path, capacity=8, max_ahead=4, sync=False)
    telemetry.watch_buffer(buffer.stats, max_age_s=0.0)
    assert value("scrit_buffer_size") == 0 and math.isnan(value("scrit_buffer_balance"))
    buffer.put([TrainingExample(problem_id=f"p{i}", prompt="q", target="t", student_correct=i % 2 == 0, version=0)
                for i in range(3)])
    # room = max_ahead 4 - the examples usable in balanced batches (1 incorrect: 1 + 1 of the 2 correct)
    assert value("scrit_buffer_size") == 3 and value("scrit_buffer_room") == 2
    assert value("scrit_buffer_balance") == pytest.approx(2 / 3)
    buffer.close()


def test_train_meter_reports_each_step():
    meter = telemetry.TrainMeter(world_size=2)
    window = {"loss_sum": 2.0, "micro": 2, "tokens": 100, "compute_s": 1.0}
    meter.step(1, window)
    assert value("scrit_trainer_loss") == 1.0 and value("scrit_trainer_tokens_per_second") == 100.0
    window.update(loss_sum=2.5, micro=3, tokens=300, compute_s=2.0)  # one more micro-batch
    meter.step(2, window)
    assert value("scrit_trainer_step") == 2 and value("scrit_trainer_loss") == 0.5
    assert value("scrit_trainer_tokens_per_second") == 200.0 and value("scrit_trainer_workers") == 2
    meter.published(1)
    meter.step(3, {"loss_sum": 0.3, "micro": 1, "tokens": 50, "compute_s": 0.5})  # window was reset
    assert value("scrit_trainer_loss") == pytest.approx(0.3) and value("scrit_trainer_tokens_per_second") == 100.0
    assert value("scrit_critic_version", role="trainer") == 1


def test_endpoint_requests_and_errors():
    telemetry.observe_request("/v1/critique", 200, 0.03)
    telemetry.observe_request("/v1/critique", 422, 0.001)
    assert value("scrit_endpoint_requests_total", route="/v1/critique", code="200") >= 1
    assert value("scrit_endpoint_errors_total", route="/v1/critique", code="422") >= 1
    assert value("scrit_endpoint_errors_total", route="/v1/critique", code="200") is None
    assert value("scrit_endpoint_request_seconds_count", route="/v1/critique") >= 2


def test_roles_record_under_their_name():
    from scrit.actors.roles import Critic
    from scrit.domains.arith import ArithDomain

    class Fixed:
        version = 1

        def generate(self, prompts, sampling):
            return [Generation(text="Conclusion: correct, no wrong step\nCorrection:", prompt_tokens=3,
                               completion_tokens=2, version=self.version) for _ in prompts]


    from scrit.messages import CritiqueRequest, Problem, Solution

    problem = Problem(id="p", domain="arith", question="Start with 2. Add 3. What is the result?", answer="5")
    student = Solution(problem_id="p", text="Step 1: 2 + 3 = 5\nThe answer is \\boxed{5}.", steps=["2 + 3 = 5"],
                       answer="5", correct=True, solver="s", version=0)
    before = value("scrit_items_total", role="critic") or 0.0
    Critic(Fixed(), ArithDomain()).critique([CritiqueRequest(problem=problem, solution=student, mode="direct")])
    assert value("scrit_items_total", role="critic") == before + 1
    # A role's label is its name from the run plan (solver0-careless, not a class-derived "solver").
    Critic(Fixed(), ArithDomain(), name="critic-b").critique([CritiqueRequest(problem=problem, solution=student)])
    assert value("scrit_items_total", role="critic-b") == 1 and value("scrit_critic_version", role="critic-b") == 1


def test_targets_file_round_trip(tmp_path):
    path = telemetry.write_targets(tmp_path / telemetry.TARGETS_FILE,
                                   {"driver": "http://10.0.0.1:8080/metrics", "critic": "http://10.0.0.2:4321/metrics",
                                    "gone": None})
    groups = json.loads(path.read_text())
    assert groups == [
        {"targets": ["10.0.0.2:4321"], "labels": {"component": "critic"}},
        {"targets": ["10.0.0.1:8080"], "labels": {"component": "driver"}},
    ]
    assert telemetry.urls_from_targets(path) == {"critic": "http://10.0.0.2:4321/metrics",
                                                 "driver": "http://10.0.0.1:8080/metrics"}
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically


def test_scrape_config_template(tmp_path):
    template = (REPO / "deploy" / "prometheus.yml").read_text()
    assert "RUN_DIR/prometheus_targets*.json" in template
    text = telemetry.prometheus_config(template, tmp_path, scrape_interval="1s")
    assert f"{tmp_path.resolve()}/prometheus_targets*.json" in text and "RUN_DIR" not in text
    assert "scrape_interval: 5s" not in text and "scrape_timeout: 1s" in text
    promtool = shutil.which("promtool")
    if promtool:
        config = tmp_path / "prometheus.yml"
        config.write_text(text)
        result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_docs_document_every_metric():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Watching a run (Prometheus, Grafana)", 1)[1].split("\n## ", 1)[0]
    assert "docs/metrics.md" in section  # the README links the metric reference
    reference = (REPO / "docs" / "metrics.md").read_text()
    missing = [name for name in telemetry.metric_names() if f"`{name}`" not in reference]
    assert not missing, f"docs/metrics.md does not document {missing}"
