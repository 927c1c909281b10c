"""A real Prometheus scrapes a short `scrit run` through deploy/prometheus.yml and its targets file.

Slow (minutes): installs Debian's ``prometheus`` package when the binary is missing (CI runs as root
on a fresh Debian-like machine), starts Prometheus on a free loopback port with its own storage, runs
``configs/tiny-test.yaml`` with metrics on, then asks Prometheus's HTTP API whether the critic-version
and buffer-size series exist and moved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers import free_port

from scrit import telemetry

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _apt_install_prometheus() -> str | None:
    """Install Debian's prometheus package non-interactively; None on success, else why not."""
    if shutil.which("apt-get") is None:
        return "no `prometheus` binary and no apt-get to install it"
    if os.geteuid() != 0:
        return "no `prometheus` binary, and installing it with apt-get needs root"
    # noninteractive: no debconf prompts. The package's postinst may try to start a system service;
    # harmless either way (a policy-rc.d may deny it; a system Prometheus would listen on :9090, not
    # on our port, with its own storage).
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or shutil.which("prometheus") is None:
        return f"apt-get install prometheus failed: {(result.stderr or result.stdout)[-500:]}"
    return None


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    if shutil.which("prometheus") is None:
        why = _apt_install_prometheus()
        if why:
            pytest.skip(why)
    return shutil.which("prometheus")


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class Prometheus:
    def __init__(self, binary: str, config: Path, storage: Path, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={storage}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=info"],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"prometheus not ready after {timeout}s: {self.log.read_text()[-2000:]}")

    def query(self, promql: str) -> list[dict]:
        data = _get_json(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert data["status"] == "success", data
        return data["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def test_prometheus_scrapes_a_run(tmp_path, prometheus_binary):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # empty: `scrit run` accepts it, and Prometheus can watch it from the start
    config = tmp_path / "prometheus.yml"
    template = (REPO / "deploy" / "prometheus.yml").read_text()
    config.write_text(telemetry.prometheus_config(template, run_dir, scrape_interval="1s"))
    run_name = f"prom-{uuid.uuid4().hex[:6]}"

    prometheus = Prometheus(prometheus_binary, config, tmp_path / "tsdb", tmp_path / "prometheus.log")
    try:
        prometheus.wait_ready()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}
        command = [sys.executable, "-m", "scrit.cli", "run", "--config", str(REPO / "configs" / "tiny-test.yaml"),
                   "--run-dir", str(run_dir), "--set", "metrics.enabled=true", "--set", f"run.name={run_name}",
                   # tiny-test's 2 steps can let the trainer exit before Prometheus scraped its exporter once
                   "--set", "train.steps_per_version=40"]
        started = time.monotonic()
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        print(f"scrit run took {time.monotonic() - started:.0f}s")

        # The run wrote its targets and printed them.
        targets = telemetry.urls_from_targets(run_dir / telemetry.TARGETS_FILE)
        components = {"driver", "critic.0", "corrector.0", "validator.0", "buffer", "solver0-seed.0", "evaluator.0",
                      "engines.0", "trainer"}
        assert components <= set(targets), targets
        assert "prometheus_targets.json" in run.stderr and targets["critic.0"] in run.stderr

        time.sleep(2)  # the last scrapes land
        window = "[30m]"
        sel = f'run="{run_name}"'
        # Prometheus found every target through file_sd and scraped it.
        up = prometheus.query(f'max_over_time(up{{job="scrit"}}{window})')
        scraped = {r["metric"].get("component") for r in up if float(r["value"][1]) == 1}
        assert components <= scraped, up

        # Critic version per role and engine (one name each: the role's, the engine's label): the published
        # version, the critic's engine and the evaluator (which scores every version) reached version 1.
        versions = prometheus.query(f"max_over_time(scrit_critic_version{{{sel}}}{window})")
        roles = {r["metric"]["role"]: float(r["value"][1]) for r in versions}
        assert {"critic", "corrector", "validator", "solver0-seed", "evaluator", "published", "critic-engine",
                "solver0-seed-engine"} <= set(roles), roles
        assert roles["published"] >= 1 and roles["evaluator"] >= 1 and roles["critic-engine"] >= 1, roles
        swaps = prometheus.value(f'max_over_time(scrit_swaps_total{{{sel},role="critic-engine"}}{window})')
        assert swaps == 1, swaps  # one engine loaded the version once for the critic, corrector, validator, evaluator
        first = prometheus.value(f'min_over_time(scrit_critic_version{{{sel},role="published"}}{window})')
        assert first == 0

        # Buffer size moved (empty at start, examples after the first pass).
        low = prometheus.value(f"min_over_time(scrit_buffer_size{{{sel}}}{window})")
        high = prometheus.value(f"max_over_time(scrit_buffer_size{{{sel}}}{window})")
        assert low is not None and high is not None and high > low, (low, high)

        # A few more stages made it through: generation counters, the trainer, evaluations.
        assert prometheus.value(f'max_over_time(scrit_items_total{{{sel},role="critic"}}{window})') > 0
        assert prometheus.value(f"max_over_time(scrit_trainer_step{{{sel}}}{window})") >= 1
        assert prometheus.value(f'max_over_time(scrit_eval_ei_f1{{{sel},version="0"}}{window})') is not None
        assert prometheus.value(f'max_over_time(scrit_pipeline_items_total{{{sel},stage="kept"}}{window})') > 0
    finally:
        prometheus.stop()
