"""The lab (``flexbn lab``): runs, reports, derives its conclusion from the numbers, and fails loudly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import flexbn
from flexbn import cli
from flexbn.lab import origin


def test_cli_lab_writes_report_and_exits_zero(tmp_path, capsys):
    assert cli.main(["lab", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "mu and var are gradient-tracked tensors in torch.nn.BatchNorm2d" in printed
    assert "mu and var are gradient-tracked tensors in torch.nn.BatchNorm2d" in report
    assert "flexbn detach_mean+var" in report


def test_origin_numbers():
    """torch equals the composition without .detach(); flexbn's fully detached mode the one with it."""
    r = origin.run(2809)
    assert r.ok
    rows = {line[:24].strip(): line[24:].split() for line in r.table.splitlines()[2:7]}
    torch_row, detached_row = rows["torch.nn.BatchNorm2d"], rows["flexbn detach_mean+var"]
    assert float(torch_row[1]) < origin.MATCH < float(torch_row[2])  # grad vs no-detach / vs detach
    assert float(detached_row[2]) < origin.MATCH < float(detached_row[1])
    assert all(
        float(row[3]) < origin.MATCH for row in rows.values()
    )  # each equals its own composition


def test_broken_mode_fails_the_lab(monkeypatch, tmp_path):
    """If a flexbn mode stopped equalling its composition, the lab must say so and exit non-zero."""
    real = flexbn.batch_norm

    def broken(*args, detach_mean=False, detach_var=False, **kwargs):
        return real(
            *args, detach_mean=detach_var, detach_var=detach_mean, **kwargs
        )  # flags swapped

    monkeypatch.setattr(flexbn.modules.F, "batch_norm", broken)
    r = origin.run(2809)
    assert not r.ok
    assert "FAILED" in r.conclusion
    assert cli.main(["lab", "--out", str(tmp_path)]) == 1


def test_conclusion_follows_the_numbers(monkeypatch):
    """Were torch's batch norm to detach its statistics, the conclusion would say so (not hard-coded)."""

    class DetachedTorch(torch.nn.Module):
        def forward(self, x):
            return origin.composition(x, True, True)

    real = origin._variants

    def variants():
        return [("torch.nn.BatchNorm2d", DetachedTorch(), (True, True)), *real()[1:]]

    monkeypatch.setattr(origin, "_variants", variants)
    assert "treats mu and var as constants" in origin.run(2809).conclusion


def test_unknown_experiment_is_an_error(capsys, tmp_path):
    assert cli.main(["lab", "--only", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err
    assert "known: origin" in err


@pytest.mark.slow
def test_python_m_flexbn_lab(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "flexbn", "lab", "--only", "origin", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "gradient-tracked" in done.stdout
    assert (tmp_path / "report.md").exists()
