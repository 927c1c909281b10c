"""The run report: plots and a markdown table from metrics.jsonl, tolerant of a torn last line."""

from __future__ import annotations

import json

from scrit.report import write_report
from scrit.rundir import read_events


def test_report_has_table_and_plots(tmp_path):
    events = [
        {"kind": "batch", "t": 1.0, "pass_rate": 0.5, "buffer_size": 10},
        {"kind": "eval", "t": 2.0, "version": 0, "n": 50, "ei_f1": 0.30, "cc_acc": 0.40, "ei_f1_scrit": 0.35,
         "acc_err": 0.2, "acc_cor": 0.9, "parse_rate": 1.0},
        {"kind": "batch", "t": 3.0, "pass_rate": 0.7, "buffer_size": 30},
        {"kind": "eval", "t": 4.0, "version": 1, "n": 50, "ei_f1": 0.45, "cc_acc": 0.50, "ei_f1_scrit": 0.5,
         "acc_err": 0.4, "acc_cor": 0.8, "parse_rate": 1.0},
    ]
    lines = [json.dumps(e) for e in events]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "bat')  # torn tail
    (tmp_path / "train_metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
        {"kind": "train", "step": 50, "version": 1, "loss": 0.9, "lr": 2e-4, "tokens_per_s": 2400.0, "wall_s": 120.0,
         "steps_per_version": 50},
        {"kind": "train", "step": 72, "version": 2, "loss": 0.5, "lr": 0.0, "tokens_per_s": 2300.0, "wall_s": 60.0,
         "steps_per_version": 22},  # re-planned for the wall budget
    ]))
    assert len(read_events(tmp_path / "metrics.jsonl")) == 4
    report = write_report(tmp_path, {"versions": 1, "seed_model": "s", "final_model": "f", "wall_seconds": 12.0,
                                     "validator_enabled": True, "require_answer_match": True})
    text = report.read_text()
    assert "| 1 | 50 | 0.450 |" in text and "| 0 | 50 | 0.300 |" in text
    assert "| 1 | 50 | 50 | 0.9000 | 2.00e-04 | 2400 | 120 |" in text  # training per version
    assert "| 2 | 72 | 22 | 0.5000 | 0.00e+00 | 2300 | 60 |" in text
    for name in ("heldout_scores.png", "pass_rate.png", "buffer_size.png", "train_loss.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert f"({name})" in text


def test_report_shows_status_and_the_kept_error_kinds_per_solver(tmp_path):
    from scrit.actors.replay_buffer import ReplayBuffer
    from scrit.domains import arith
    from scrit.messages import TrainingExample
    from scrit.prompts import critic_prompt
    from scrit.report import kept_error_kinds

    problem = arith.parse_problem("Start with 12. Add 5. Multiply by 3. What is the result?")
    students = {"result": ["12 + 5 = 17", "17 * 3 = 52"], "number": ["12 + 6 = 18", "18 * 3 = 54"],
                "none": problem.correct_steps()}
    buffer = ReplayBuffer(tmp_path)
    buffer.put([TrainingExample(prompt=critic_prompt(problem.text, arith.render_solution(steps)), target="t",
                                student_correct=kind == "none", problem_id="p", version=0, solver=solver)
                for solver, kind, steps in [("solver0-careless", k, s) for k, s in students.items()]
                + [("reference", "none", students["none"])]])
    buffer.close()
    mix = kept_error_kinds(tmp_path)
    assert mix == {"solver0-careless": {"result": 1, "number": 1, "none": 1}, "reference": {"none": 1}}
    text = write_report(tmp_path, {"status": "failed", "error": {"component": "critic.0", "message": "boom"},
                                   "restarts": {"buffer": 1}, "kept_error_kinds": mix}).read_text()
    assert "status: **failed** (in critic.0: boom" in text and "{'buffer': 1}" in text
    assert "| solver0-careless | 1 | 1 | 0 | 0 | 1 | 0 | 3 |" in text


def test_summary_is_written_even_when_a_report_statistic_fails(tmp_path, monkeypatch):
    """A 14-minute default run once lost its summary.json to an IndexError in kept_error_kinds."""
    import scrit.report
    from scrit.actors.run import SelfPlayRun
    from scrit.config import default_config

    def broken(run_dir):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(scrit.report, "kept_error_kinds", broken)
    run = SelfPlayRun(default_config(), tmp_path)
    summary = run._summary(None, "completed", None)
    assert summary["kept_error_kinds"] == {} and summary["status"] == "completed"
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    assert (tmp_path / "report.md").is_file()
    assert "IndexError: tuple index out of range" in (tmp_path / "run.log").read_text()
