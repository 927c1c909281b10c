"""`scrit eval` end to end with the shipped seed model on small splits, and its error handling."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from scrit.cli import app

KEYS = {"n", "ei_f1", "ei_f1_scrit", "cc_acc", "acc_err", "acc_cor", "parse_rate"}


def run_eval(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["eval", *args])
    return result.exit_code, result.stdout, result.stderr


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def seed_contrastive() -> dict:
    code, out, err = run_eval("--model", "seed", "--bench", "arith", "--limit", "40", "--mode", "contrastive",
                              "--json")
    assert code == 0, err
    return last_json(out)


def test_seed_eval_json_contract(seed_contrastive):
    report = seed_contrastive
    assert report["model"] == "seed" and report["mode"] == "contrastive" and report["bench"] == "arith"
    assert set(report["splits"]["arith"]) == KEYS and set(report["average"]) == KEYS
    assert report["splits"]["arith"]["n"] == 40
    for key in KEYS - {"n"}:
        assert 0.0 <= report["average"][key] <= 1.0


def test_seed_critiques_well_with_a_reference(seed_contrastive):
    """The shipped seed's contrastive critique is far above chance on held-out items (target: >= 0.6 on 300)."""
    average = seed_contrastive["average"]
    assert average["parse_rate"] >= 0.9
    assert average["ei_f1"] >= 0.45


def test_processbench_eval_prints_null_cc_acc(shared_data):
    code, out, err = run_eval("--model", "seed", "--bench", "processbench", "--data",
                              str(shared_data / "processbench"), "--split", "gsm8k", "--limit", "3",
                              "--max-new-tokens", "48", "--json")
    assert code == 0, err
    report = last_json(out)
    assert list(report["splits"]) == ["gsm8k"] and report["splits"]["gsm8k"]["n"] == 3
    assert report["average"]["cc_acc"] is None


def test_solve_mode_reports_accuracy():
    code, out, err = run_eval("--model", "seed", "--bench", "arith", "--limit", "8", "--mode", "solve", "--json")
    assert code == 0, err
    split = last_json(out)["splits"]["arith"]
    assert split["n"] == 8 and 0.0 <= split["solve_acc"] <= 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bench", "processbench"], "needs --data"),
        (["--bench", "nope"], "unknown bench"),
        (["--mode", "sideways"], "--mode must be one of"),
        (["--backend", "vllm", "--dtype", "fp8"], "--dtype must be one of auto, float32, bfloat16, float16"),
        (["--model", "/no/such/model"], "not found"),
        (["--bench", "processbench", "--data", "/no/such/dir"], "no such file"),
    ],
)
def test_bad_arguments_fail_clearly(args, message):
    code, _, err = run_eval(*args)
    assert code == 2 and message in err


def test_contrastive_needs_references(shared_data):
    code, _, err = run_eval("--bench", "processbench", "--data", str(shared_data / "processbench"), "--limit", "1",
                            "--mode", "contrastive")
    assert code == 2 and "needs a reference" in err
