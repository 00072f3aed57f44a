"""The lab's experiments (``flexbn lab --quick``): each runs, is ``ok``, says what its numbers say, draws
its figures into the report; the run is deterministic for a seed; the command line's options work; a
missing optional extra gives a note, not a crash.

The whole quick lab runs once per session (``quick_lab``), through ``flexbn.cli.main`` with every
experiment's :class:`~flexbn.lab.Result` recorded on the way.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flexbn import cli, lab
from flexbn.lab import _common, detach, dropout, ghost, nonid, speed
from flexbn.lab._common import fmt_pct, mean

# The lab runs flexbn on its default backend; both backends are tested by the rest of the suite.
pytestmark = pytest.mark.one_backend

SEED = 2809
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class QuickLab:
    status: int
    stdout: str
    stderr: str
    out: Path
    results: dict[str, lab.Result]
    seconds: float

    @property
    def report(self) -> str:
        return (self.out / "report.md").read_text(encoding="utf-8")


def one_line(text: str) -> str:
    """``text`` with the terminal wrapping of the printed conclusions undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory: pytest.TempPathFactory) -> QuickLab:
    """``flexbn lab --quick --seed 2809 --out DIR``, every experiment's Result recorded."""
    out = tmp_path_factory.mktemp("lab")
    results: dict[str, lab.Result] = {}

    def recording(name: str, experiment: lab.Experiment) -> lab.Experiment:
        def run(seed: int, *, quick: bool = False, out: Path | None = None) -> lab.Result:
            assert quick  # the CLI passed --quick through
            results[name] = experiment(seed, quick=quick, out=out)
            return results[name]

        return run

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name, experiment in list(lab.EXPERIMENTS.items()):
            mp.setitem(lab.EXPERIMENTS, name, recording(name, experiment))
        start = time.perf_counter()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = cli.main(
                ["lab", "--quick", "--seed", str(SEED), "--out", str(out), "--jobs", "2"]
            )
        seconds = time.perf_counter() - start
    return QuickLab(status, stdout.getvalue(), stderr.getvalue(), out, results, seconds)


NAMES = list(lab.EXPERIMENTS)


def test_quick_lab_runs_every_experiment(quick_lab):
    assert quick_lab.status == 0, quick_lab.stderr
    assert list(quick_lab.results) == NAMES
    assert "FAILED" not in quick_lab.stdout + quick_lab.stderr
    assert "quick run (--quick)" in quick_lab.report
    assert f"Seed {SEED};" in quick_lab.report


@pytest.mark.parametrize("name", NAMES)
def test_experiment_ok_and_printed(quick_lab, name):
    r = quick_lab.results[name]
    assert r.ok, r.conclusion
    assert "\n" not in r.conclusion
    printed = one_line(quick_lab.stdout)
    assert f"== {name}: {r.title}" in quick_lab.stdout
    assert one_line(r.conclusion) in printed
    assert r.conclusion in quick_lab.report
    assert r.table in quick_lab.report


@pytest.mark.parametrize("name", NAMES)
def test_figures_are_pngs_embedded_in_the_reports(quick_lab, name):
    from PIL import Image  # matplotlib's own dependency

    figures = quick_lab.results[name].figures
    assert len(figures) >= 1
    html = (quick_lab.out / "report.html").read_text(encoding="utf-8")
    for fig in figures:
        assert fig.parent == quick_lab.out
        data = fig.read_bytes()
        assert data.startswith(PNG)
        assert 20_000 < len(data) < 500_000  # a drawn figure, a small file
        with Image.open(fig) as image:
            assert image.info["dpi"][0] == pytest.approx(_common.DPI, abs=0.1)
            assert _common.DPI >= 150
            assert image.width >= 1000  # wide enough for a slide
        assert f"figure: {fig}" in quick_lab.stdout
        assert re.search(rf"!\[[^\]]+\]\({re.escape(fig.name)}\)", quick_lab.report)
        assert f'<img src="{fig.name}"' in html
    assert sorted(p.name for p in quick_lab.out.glob("*.png")) == sorted(f"{n}.png" for n in NAMES)


def test_html_and_json_reports_hold_what_the_markdown_holds(quick_lab):
    """report.json renders back to report.md exactly; report.html has every section, escaped."""
    import html
    import json

    from flexbn.lab import report

    saved = json.loads((quick_lab.out / "report.json").read_text(encoding="utf-8"))
    again = report.Report.from_json(saved, quick_lab.out)
    assert report.markdown(again, quick_lab.out) == quick_lab.report
    assert [e["name"] for e in saved["experiments"]] == NAMES
    assert saved["quick"] is True
    assert saved["seed"] == SEED
    assert saved["jobs"] == 2
    page = (quick_lab.out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for name, r in quick_lab.results.items():
        assert f'<h2 id="{name}"><code>{name}</code>: {html.escape(r.title)}' in page
        assert html.escape(r.table) in page
        assert r.about  # every experiment says what it asks and how
        assert "**" not in page  # the Markdown emphasis became HTML


# --------------------------------------------------------- each conclusion quotes its own numbers


def test_origin_conclusion_numbers(quick_lab):
    r = quick_lab.results["origin"]
    torch64 = r.data["float64"]["torch.nn.BatchNorm2d"]
    assert torch64["grad_tracked"] < 1e-10 < 0.1 < torch64["grad_detached"]
    assert f"{torch64['grad_tracked']:.0e} in float64" in r.conclusion
    assert f"by up to {torch64['grad_detached']:.2g}" in r.conclusion


def test_detach_conclusion_numbers(quick_lab):
    r = quick_lab.results["detach"]
    modes, steps = r.data["modes"], r.data["steps"]
    dm, default = modes["flexbn detach_mean"], modes["flexbn default"]
    assert steps == detach.QUICK_STEPS
    assert dm["growth"] > detach.GROW
    assert modes["flexbn detach_mean+var"]["growth"] > detach.GROW
    for label in ("torch.nn.BatchNorm1d", "flexbn default", "flexbn detach_var"):
        assert modes[label]["b_change"] < detach.STAY
    assert all(m["loss_change"] < detach.FIXED for m in modes.values())
    per_step = (dm["b_end"] - dm["b_start"]) / (steps - 1)
    for quoted in (
        f"from {dm['b_start']:.3g} to {dm['b_end']:.3g} in {steps} steps",
        f"({dm['growth']:.0f}x, about {per_step:.3g} per step",
        f"the loss stayed at {dm['loss_start']:.4g}",
        f"(last {default['last_grad']:.0e})",
    ):
        assert quoted in r.conclusion


def test_nonid_conclusion_numbers(quick_lab):
    r = quick_lab.results["nonid"]
    acc = r.data["accuracy"]
    gap = acc[nonid.IID] - acc[nonid.PLAIN]
    recovered = (acc[nonid.RENORM] - acc[nonid.PLAIN]) / gap
    assert gap >= nonid.DROP
    assert recovered >= nonid.RECOVER
    assert f"cost plain batch norm {100 * gap:.1f} points" in r.conclusion
    assert f"({fmt_pct(acc[nonid.PLAIN])} against {fmt_pct(acc[nonid.IID])}" in r.conclusion
    assert (
        f"reached {fmt_pct(acc[nonid.RENORM])}, recovering {100 * recovered:.0f}%" in r.conclusion
    )
    assert f"{fmt_pct(acc[nonid.BAGS])}" in r.conclusion
    curves = r.data["curves"]
    assert all(len(c) == 1 and len(c[0]) == nonid.QUICK_EPOCHS for c in curves.values())
    assert acc[nonid.IID] == pytest.approx(mean(curves[nonid.IID][0][-nonid.LAST :]))


def test_dropout_conclusion_numbers(quick_lab):
    r = quick_lab.results["dropout"]
    points = {(p["rate"], p["arm"]): p for p in r.data["points"]}
    top = max(dropout.QUICK_RATES)
    plain, rec, pre = (points[top, arm] for arm in dropout.ARMS)
    assert plain["ratio"] < dropout.SHIFT
    assert abs(rec["ratio"] - 1) < dropout.REPAIRED
    assert abs(pre["ratio"] - 1) < dropout.REPAIRED
    assert f"input variance is {plain['ratio']:.2f}x its running variance" in r.conclusion
    assert f"recompute_stats brings it to {rec['ratio']:.2f}x" in r.conclusion
    assert f"(stats_input=) to {pre['ratio']:.2f}x" in r.conclusion
    assert f"{fmt_pct(plain['accuracy'])} plain" in r.conclusion
    # without dropout there is no shift to speak of, and stats_input changes nothing but rounding (the
    # gradient reaches the layer by two paths), which training amplifies a little
    zero = points[0.0, dropout.PLAIN]
    assert abs(zero["ratio"] - 1) < 0.15
    assert points[0.0, dropout.STATS_INPUT]["ratio"] == pytest.approx(zero["ratio"], abs=0.02)


def test_ghost_conclusion_numbers(quick_lab):
    r = quick_lab.results["ghost"]
    points = {p["size"]: p for p in r.data["points"]}
    assert sorted(points) == sorted(ghost.QUICK_SIZES)
    assert r.data["chunk_error"] < ghost.CHUNK_TOL
    plain, small = points[ghost.BATCH], points[min(points)]
    loss_plain, loss_small = mean(plain["train_loss"]), mean(small["train_loss"])
    assert loss_small >= ghost.NOISIER * loss_plain
    assert f"{loss_small:.3g} at size {min(points)} against {loss_plain:.3g}" in r.conclusion
    assert f"plain batch norm {fmt_pct(mean(plain['accuracy']))}" in r.conclusion
    assert f"(max diff {r.data['chunk_error']:.0e})" in r.conclusion


def test_ddp_conclusion_numbers(quick_lab):
    r = quick_lab.results["ddp"]
    assert r.data["drift"] == max(row["drift"] for row in r.data["rows"]) < 1e-4
    assert f"after {len(r.data['rows'])} steps" in r.conclusion
    assert f"at most {r.data['drift']:.1e}" in r.conclusion


def test_speed_conclusion_numbers(quick_lab):
    r = quick_lab.results["speed"]
    cells = r.data["cells"]
    shapes = list(speed.QUICK_SHAPES)
    assert {c["shape"] for c in cells} == set(shapes)
    for c in cells:
        assert c["ms"] > 0
        if c["candidate"] == "native":
            assert c["ratio"] == 1.0
    flex = [c["ratio"] for c in cells if c["variant"] == "standard" and c["candidate"] == "flexbn"]
    assert f"flexbn {min(flex):.2f}-{max(flex):.2f}x" in r.conclusion or (
        f"flexbn {min(flex):.2f}x" in r.conclusion
    )
    assert r.data["environment"]["threads"] >= 1


@pytest.mark.parametrize(
    ("flex", "words"),
    [
        pytest.param((0.4, 0.5), "faster than torch's native kernel on every shape", id="faster"),
        pytest.param((1.2, 1.5), "slower than torch's native kernel on every shape", id="slower"),
        pytest.param((0.4, 1.5), "faster than torch's native kernel on 1 of 2 shapes", id="mixed"),
    ],
)
def test_speed_conclusion_against_native_follows_the_ratios(flex, words):
    """The sentence about native comes from the measured ratios and names the backend that ran."""
    cells = []
    for shape, f in zip(("8x4", "16x4"), flex, strict=True):
        for variant in speed.VARIANTS:
            cells += [
                speed.Cell(shape, variant, "native", 1.0, 1.0),
                speed.Cell(shape, variant, "flexbn", f, f),
                speed.Cell(shape, variant, "composition", 3.0, 3.0),
            ]
    env = {"threads": 1, "load": (0.1, 0.2), "device": "cpu", "backend": "cpp"}
    text = speed.conclude(cells, env)
    assert f"flexbn's cpp backend is {words}" in text
    assert "faster than the composition on every shape" in text


# ------------------------------------------------------- conclusions follow the numbers (negative)


def test_detach_fails_if_the_default_let_b_grow():
    runs = detach.measure(0, steps=5)
    broken = [
        detach.Run(r.label, r.b_norm[:1] + tuple(v * 100 for v in r.b_norm[1:]), r.loss, 1.0)
        if r.label == "flexbn default"
        else r
        for r in runs
    ]
    text, ok = detach.conclude(broken)
    assert not ok
    assert "FAILED: flexbn default: |b| did not behave as expected" in text


def test_nonid_fails_without_the_effect():
    flat = (0.9, 0.9, 0.9)
    m = nonid.Measurement({arm: (flat,) for arm in nonid.ARMS})
    text, ok = nonid.conclude(m)
    assert not ok
    assert "cost plain batch norm 0.0 points" in text
    assert "FAILED" in text
    curves = {nonid.IID: 0.97, nonid.PLAIN: 0.85, nonid.RENORM: 0.96, nonid.BAGS: 0.95}
    m = nonid.Measurement({arm: ((a, a, a),) for arm, a in curves.items()})
    text, ok = nonid.conclude(m)
    assert ok
    assert "recovering 92% of the gap" in text
    assert (
        "Per-bag statistics (groups=, the bags' own statistics in training and at test) helps"
        in (text)
    )


def test_dropout_fails_without_a_shift_or_a_repair():
    def points(plain: float, repaired: float) -> list[dropout.Point]:
        return [
            dropout.Point(rate, arm, ratio, ratio, ratio, 0.9)
            for rate in (0.0, 0.5)
            for arm, ratio in zip(
                dropout.ARMS, (plain if rate else 1.0, repaired, repaired), strict=True
            )
        ]

    assert dropout.conclude(points(0.7, 1.01))[1]
    for plain, repaired in ((0.95, 1.0), (0.7, 0.8)):
        text, ok = dropout.conclude(points(plain, repaired))
        assert not ok
        assert "FAILED" in text


def test_ghost_fails_if_chunks_are_wrong_or_noise_absent():
    points = [ghost.Point(256, (0.98,), (0.004,)), ghost.Point(4, (0.97,), (0.3,))]
    assert ghost.conclude(points, 1e-7)[1]
    assert not ghost.conclude(points, 1e-2)[1]
    quiet = [ghost.Point(256, (0.98,), (0.004,)), ghost.Point(4, (0.97,), (0.005,))]
    text, ok = ghost.conclude(quiet, 1e-7)
    assert not ok
    assert "FAILED" in text


def test_ghost_chunk_check_detects_whole_batch_statistics(monkeypatch):
    """The per-chunk check can fail: with the virtual batch size ignored it sees the difference."""
    real = ghost.flexbn.BatchNorm1d
    monkeypatch.setattr(
        ghost.flexbn,
        "BatchNorm1d",
        lambda c, virtual_batch_size=None, **kw: real(c, **kw),
    )
    assert ghost.chunk_check(32) > 1e-2


# -------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
@pytest.mark.parametrize("name", ["dropout", "ghost"])
def test_same_numbers_whatever_the_threads_and_jobs(quick_lab, name, threads):
    """Run again in this process (the quick lab ran it in 2 worker processes) with torch set to 1 or 2
    threads: the same numbers, and the caller's thread count is restored. (The C++ kernels and the
    matrix products reduce in an order that depends on the thread count: the lab runs on one.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        again = lab.EXPERIMENTS[name](SEED, quick=True, out=None)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert again.data == quick_lab.results[name].data
    assert again.conclusion == quick_lab.results[name].conclusion
    assert again.figures == ()  # no directory, no figure


def test_map_jobs_runs_in_worker_processes_in_order():
    """The pool's results come back in the jobs' order, computed in other processes on one thread."""
    import torch

    with _common.worker_pool(2):
        assert _common.map_jobs(pow, [(2, i) for i in range(5)], desc="test") == [1, 2, 4, 8, 16]
        pids = _common.map_jobs(os.getpid, [()] * 4, desc="test")
        assert os.getpid() not in pids
        assert _common.map_jobs(torch.get_num_threads, [()] * 2, desc="test") == [1, 1]
    assert _common.map_jobs(os.getpid, [()] * 2, desc="test") == [os.getpid()] * 2  # no pool


def test_dropout_masks_are_seeded():
    """Dropout draws from torch's global generator: seeded too. Another seed gives other numbers."""
    once = dropout.measure(SEED, epochs=1, rates=(0.5,))
    assert dropout.measure(SEED, epochs=1, rates=(0.5,)) == once
    assert dropout.measure(SEED + 1, epochs=1, rates=(0.5,)) != once


def test_experiments_leave_the_global_generator_alone():
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ghost.measure(0, epochs=1, sizes=(256,), seeds=1)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------ command line


def test_only_is_repeatable_and_out_is_used(tmp_path, capsys):
    out = tmp_path / "nested" / "dir"
    argv = ["lab", "--quick", "--only", "detach", "--only", "origin", "--only", "detach"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("== detach:") == 1
    assert printed.index("== detach:") < printed.index("== origin:")
    assert "== nonid" not in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "detach.png",
        "origin.png",
        "report.html",
        "report.json",
        "report.md",
    ]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## `detach`:" in report
    assert "## `origin`:" in report
    assert "`ghost`:" not in report


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_jobs_must_be_positive(jobs, tmp_path, capsys):
    assert cli.main(["lab", "--only", "detach", "--jobs", jobs, "--out", str(tmp_path)]) == 2
    assert f"--jobs must be an integer >= 1, but got {jobs}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_name_exits_2_before_running_anything(tmp_path, capsys):
    assert (
        cli.main(["lab", "--quick", "--only", "detach", "--only", "nope", "--out", str(tmp_path)])
        == 2
    )
    captured = capsys.readouterr()
    assert "unknown experiment 'nope'" in captured.err
    assert "known: origin, detach, nonid, dropout, ghost, ddp, speed" in captured.err
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_default_out_is_flexbn_lab(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["lab", "--quick", "--only", "detach"]) == 0
    assert (tmp_path / "flexbn-lab" / "report.md").exists()
    assert (tmp_path / "flexbn-lab" / "detach.png").exists()
    assert "report written to flexbn-lab/report.md" in capsys.readouterr().out


def test_failed_experiment_fails_the_lab(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(detach, "GROW", 1e9)  # an effect that cannot be reached
    assert cli.main(["lab", "--quick", "--only", "detach", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "FAILED: detach" in captured.err
    assert "**FAILED**" in (tmp_path / "report.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- missing extras


def test_without_matplotlib_figures_are_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert not _common.have_matplotlib()
    assert lab.run(only=["detach"], out=tmp_path, quick=True) == 0
    captured = capsys.readouterr()
    assert (
        "figures skipped: matplotlib is not installed (pip install 'flexbn[lab]')" in captured.err
    )
    assert list(tmp_path.glob("*.png")) == []
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "> figures skipped" in report
    assert "![" not in report


def test_without_scikit_learn_digits_experiments_are_skipped(monkeypatch, tmp_path, capsys):
    for module in ("sklearn", "sklearn.datasets"):  # (both: the submodule may be imported already)
        monkeypatch.setitem(sys.modules, module, None)
    _common._load_digits.cache_clear()
    try:
        assert lab.run(only=["nonid", "detach"], out=tmp_path, quick=True) == 0
    finally:
        _common._load_digits.cache_clear()
    captured = capsys.readouterr()
    note = (
        "skipped nonid: it needs scikit-learn for its data set (digits): pip install 'flexbn[lab]'"
    )
    assert note in captured.err
    assert "== detach:" in captured.out
    assert "== nonid" not in captured.out
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert f"> {note}" in report
    assert "## `detach`:" in report


@pytest.mark.parametrize("tqdm_installed", [True, False], ids=["tqdm", "no-tqdm"])
def test_progress_passes_items_through(monkeypatch, tqdm_installed):
    if not tqdm_installed:
        monkeypatch.setitem(sys.modules, "tqdm", None)
    assert list(_common.progress(range(4), desc="test")) == [0, 1, 2, 3]
