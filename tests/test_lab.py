"""The lab (``flexbn lab``): runs, reports, derives its conclusion from the numbers, and fails loudly."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

import flexbn
from flexbn import cli
from flexbn.lab import origin

# The lab runs flexbn on its default backend; both backends are tested by the rest of the suite.
pytestmark = pytest.mark.one_backend

TRACKED_ANSWER = "torch.nn.BatchNorm2d back-propagates through mu and var"


def one_line(text: str) -> str:
    """``text`` with the terminal wrapping of the printed conclusion undone."""
    return " ".join(text.split())


def test_cli_lab_writes_report_and_exits_zero(tmp_path, capsys):
    assert cli.main(["lab", "--only", "origin", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert TRACKED_ANSWER in one_line(printed)
    assert TRACKED_ANSWER in report
    assert "flexbn gives either" in report
    for label in ["manual, .detach()", "torch.nn.BatchNorm2d", "flexbn detach_mean+var"]:
        assert label in report
    assert "in float32" in report
    assert "in float64" in report
    assert "FAIL" not in report


@pytest.mark.parametrize("dtype", origin.DTYPES)
def test_origin_numbers(dtype):
    """torch equals the composition without .detach(); flexbn's fully detached mode the one with it;
    every flexbn mode equals its own composition."""
    m = origin.measure(2809, dtype)
    tol = origin.TOLERANCE[dtype]
    t, both = m.row("torch.nn.BatchNorm2d"), m.row("flexbn detach_mean+var")
    assert t.grad_tracked < tol < 0.1 < t.grad_detached
    assert both.grad_detached < tol < 0.1 < both.grad_tracked
    assert m.row("flexbn.BatchNorm2d").grad_tracked < tol
    assert all(r.output < tol for r in m.rows)  # detaching never changes the output
    own = {r.label: r.own for r in m.rows if r.own is not None}
    assert set(own) == set(origin.MODES)
    assert all(d < tol for d in own.values())
    assert m.failures == []


def test_origin_conclusion_and_ok():
    r = origin.run(2809)
    assert r.ok
    assert r.conclusion.startswith(TRACKED_ANSWER)
    assert "\n" not in r.conclusion
    assert "in float64" in r.conclusion
    assert "in float32" in r.conclusion


def test_broken_mode_fails_the_lab(monkeypatch, tmp_path, capsys):
    """If a flexbn mode stopped equalling its composition, the lab must say so and exit non-zero."""
    real = flexbn._core.plan.build

    def swapped(*args, detach_mean=False, detach_var=False, **kwargs):
        return real(*args, detach_mean=detach_var, detach_var=detach_mean, **kwargs)

    monkeypatch.setattr(flexbn._core.plan, "build", swapped)
    m = origin.measure(2809, torch.float64)
    assert m.failures == ["flexbn detach_mean", "flexbn detach_var"]
    r = origin.run(2809)
    assert not r.ok
    assert "FAILED: flexbn detach_mean in float32" in r.conclusion
    assert "flexbn gives either" not in r.conclusion
    assert cli.main(["lab", "--only", "origin", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "FAILED: origin" in captured.err
    assert "FAIL" in captured.out
    assert "**FAILED**" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_nan_counts_as_a_failure(monkeypatch):
    monkeypatch.setattr(origin, "_diff", lambda a, b: float("nan"))
    assert not origin.run(2809).ok


def test_conclusion_follows_the_numbers(monkeypatch):
    """Were torch's batch norm to detach its statistics, the conclusion would say so (not hard-coded)."""
    real = origin._variants

    def variants(dtype):
        return [
            (label, origin._composition(origin.DETACHED), None)
            if label == "torch.nn.BatchNorm2d"
            else (label, fn, flags)
            for label, fn, flags in real(dtype)
        ]

    monkeypatch.setattr(origin, "_variants", variants)
    r = origin.run(2809)
    assert r.ok  # torch's behaviour is reported, not required
    assert r.conclusion.startswith("torch.nn.BatchNorm2d treats mu and var as constants")


def replace_torch_row(m: origin.Measurement, **changes: float) -> origin.Measurement:
    rows = tuple(
        dataclasses.replace(r, **changes) if r.label == "torch.nn.BatchNorm2d" else r
        for r in m.rows
    )
    return dataclasses.replace(m, rows=rows)


def test_conclusion_covers_every_verdict():
    m32, m64 = (origin.measure(2809, d) for d in origin.DTYPES)
    text, ok = origin.conclude([m32, replace_torch_row(m64, grad_tracked=0.5)])
    assert ok
    assert "matches neither composition" in text
    text, _ = origin.conclude([m32, replace_torch_row(m64, grad_detached=0.0)])
    assert "cannot tell" in text
    text, _ = origin.conclude([replace_torch_row(m32, grad_tracked=0.5, grad_detached=0.0), m64])
    assert text.startswith(TRACKED_ANSWER)
    assert "float32 disagrees" in text


def test_origin_main_prints_the_answer(capsys):
    assert origin.main() == 0
    assert TRACKED_ANSWER in one_line(capsys.readouterr().out)


def test_seed_option(tmp_path):
    assert cli.main(["lab", "--only", "origin", "--seed", "0", "--out", str(tmp_path)]) == 0
    assert "Seed 0;" in (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Seed 0;" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_unknown_experiment_is_an_error(capsys, tmp_path):
    assert cli.main(["lab", "--only", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err
    assert "known: origin" in err
    assert not (tmp_path / "report.md").exists()


def test_python_m_flexbn_lab(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "flexbn", "lab", "--only", "origin", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert TRACKED_ANSWER in one_line(done.stdout)
    assert (tmp_path / "report.md").exists()
