"""Regenerate ``docs/lab.md``, its figures and the README's lab numbers from a real run of the lab.

    python benchmarks/lab_docs.py                # full lab and quick lab, timed: everything
    python benchmarks/lab_docs.py --only speed   # rerun one experiment (repeatable); the rest is kept

The full run is ``python -m flexbn lab`` (what ``make lab`` runs) and the quick run ``python -m flexbn lab
--quick``, each in a fresh process and timed from outside, wall clock, with the load average before and
after. The full run's ``report.json`` is kept as ``docs/figures/lab.json`` and its figures as
``docs/figures/<name>.png``; ``docs/lab.md`` is rendered from ``lab.json`` and the text below, so it is
never edited by hand. With ``--only``, the named experiments run alone (``flexbn lab --only NAME``), their
entries in ``lab.json`` and their figures are replaced, and the page is rendered again; the timings stay
those of the last full regeneration.

The README's lab paragraph (between ``<!-- lab_docs: ... -->`` markers) quotes three conclusions and the
timings; it is rewritten from the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from flexbn.lab import EXPERIMENTS, SUMMARIES
from flexbn.lab.report import Report, markdown

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FIGURES = DOCS / "figures"
DATA = FIGURES / "lab.json"
PAGE = DOCS / "lab.md"
README = ROOT / "README.md"
COMMAND = "python benchmarks/lab_docs.py"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _run_lab(args: list[str], out: Path) -> dict[str, Any]:
    """``python -m flexbn lab ARGS --out OUT`` in a fresh process: its wall time and load averages."""
    before = _load()
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flexbn", "lab", *args, "--out", str(out)], check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"lab_docs: `flexbn lab {' '.join(args)}` exited with {done.returncode}")
    return {
        "command": " ".join(["flexbn lab", *args]),
        "seconds": seconds,
        "load": [before, _load()],
    }


def _cpu() -> str:
    from flexbn.bench import _cpu_name

    return _cpu_name()


def regenerate(only: list[str]) -> None:
    """Run the lab (all of it, or ``only``), keep its data and figures, render the page and README."""
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full"
        if only:
            saved = json.loads(DATA.read_text(encoding="utf-8"))
            args = [a for name in only for a in ("--only", name)]
            _run_lab(args, full)
            fresh = json.loads((full / "report.json").read_text(encoding="utf-8"))
            new = {e["name"]: e for e in fresh["experiments"]}
            saved["experiments"] = [new.get(e["name"], e) for e in saved["experiments"]]
            saved["partial"] = sorted({*saved.get("partial", []), *only})
            data = saved
        else:
            timing = {
                "full": _run_lab([], full),
                "quick": _run_lab(["--quick"], Path(tmp) / "quick"),
                "cores": os.cpu_count(),
                "cpu": _cpu(),
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"),
            }
            data = json.loads((full / "report.json").read_text(encoding="utf-8"))
            data["timing"] = timing
        FIGURES.mkdir(parents=True, exist_ok=True)
        for png in full.glob("*.png"):
            shutil.copyfile(png, FIGURES / png.name)
    DATA.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    render()


def render() -> None:
    """Write ``docs/lab.md`` and the README's lab paragraphs from ``docs/figures/lab.json``."""
    data = json.loads(DATA.read_text(encoding="utf-8"))
    report = Report.from_json(data, FIGURES)
    PAGE.write_text(page(report, data), encoding="utf-8")
    text = README.read_text(encoding="utf-8")
    for key, body in readme_blocks(report, data).items():
        text = _replace_block(text, key, body)
    README.write_text(text, encoding="utf-8")


def _replace_block(text: str, key: str, body: str) -> str:
    start, end = f"<!-- lab_docs:{key} -->", f"<!-- /lab_docs:{key} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        sys.exit(f"lab_docs: README.md has no {start} ... {end} block")
    return pattern.sub(lambda _: f"{start}\n{_wrap(body)}\n{end}", text)


def _wrap(text: str, width: int = 110) -> str:
    """Markdown paragraphs and ``- `` bullets of ``text`` wrapped to ``width`` columns."""
    out = []
    for para in text.strip().split("\n"):
        bullet = para.startswith("- ")
        out.append(
            textwrap.fill(
                para, width, subsequent_indent="  " if bullet else "", break_on_hyphens=False
            )
            if para
            else ""
        )
    return "\n".join(out)


def _timing_sentence(data: dict[str, Any]) -> str:
    t = data["timing"]
    full, quick = t["full"], t["quick"]
    return (
        f"`{full['command']}` (what `make lab` runs) took {full['seconds']:.0f} s and "
        f"`{quick['command']}` {quick['seconds']:.0f} s, wall clock from a fresh process, on "
        f"{t['cores']} cores ({t['cpu']}; load average {full['load'][0]:.1f} before the full run, "
        f"{quick['load'][1]:.1f} after the quick one; {t['date']}; measured by `{COMMAND}`)"
    )


def _exp(x: float) -> str:
    """``2e-7`` rather than ``2e-07``."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.0e}").replace("e+", "e")


def readme_blocks(report: Report, data: dict[str, Any]) -> dict[str, str]:
    """The README's generated paragraphs: the lab's timing, and three conclusions with their numbers."""
    r = report.results
    blocks = {"timing": f"Timing: {_timing_sentence(data)}."}
    quotes = []
    if "detach" in r:
        d = r["detach"].data
        dm = d["modes"]["flexbn detach_mean"]
        change = max(m["loss_change"] for m in d["modes"].values())
        quotes.append(
            f"- **Detached mean:** `|b|` grew from {dm['b_start']:.3g} to {dm['b_end']:.3g} in "
            f"{d['steps']} steps while the loss stayed at {dm['loss_start']:.4g} (relative change "
            f"{_exp(change)}); with the gradient through the mean -- flexbn's default, as torch -- the "
            "gradient on `b` is zero to rounding and `b` does not move."
        )
    if "nonid" in r:
        acc = r["nonid"].data["accuracy"]
        seeds = len(r["nonid"].data["per_seed"]["plain BN"])
        quotes.append(
            "- **Non-i.i.d. batches:** batches of one or two classes cost plain batch norm "
            f"{100 * (acc['i.i.d. batches'] - acc['plain BN']):.1f} points of held-out accuracy "
            f"({100 * acc['plain BN']:.1f}% against {100 * acc['i.i.d. batches']:.1f}% with i.i.d. "
            f"batches, {seeds} seeds); batch renorm (`renorm=True`) on the same batches reached "
            f"{100 * acc['batch renorm']:.1f}%."
        )
    if "dropout" in r:
        points = r["dropout"].data["points"]
        top = max(p["rate"] for p in points)
        ratio = {p["arm"]: p["ratio"] for p in points if p["rate"] == top}
        quotes.append(
            f"- **Dropout before BN:** at p={top} the batch norm's input variance at inference is "
            f"{ratio['plain']:.2f}x its running variance; `flexbn.recompute_stats` brings it to "
            f"{ratio['recompute_stats']:.2f}x, statistics taken before dropout (`stats_input=`) to "
            f"{ratio['stats_input']:.2f}x."
        )
    blocks["conclusions"] = (
        f"Three of its conclusions ({report.mode}, seed {report.seed}; every number in "
        "[docs/lab.md](docs/lab.md)):\n\n" + "\n".join(quotes)
    ).replace(" -- ", " — ")
    return blocks


HEAD = """# The lab: `flexbn lab`

<!-- Generated by `{command}` from a run of the lab (docs/figures/lab.json): do not edit by hand. -->

`flexbn lab` (`make lab`, `python -m flexbn lab`) runs small experiments that show, with numbers measured on
the spot, why the statistics of batch norm deserve control: what happens when gradient does not flow through
them, when they are taken over the wrong set of samples, when they come from activations that inference
never sees. Each experiment prints a table and a one-line conclusion **derived from the numbers it just
measured** (the text changes if the numbers do), and says whether flexbn behaved as specified and the effect
the paper describes was observed; `flexbn lab` exits with status 1 if not.

```bash
flexbn lab                          # all experiments, full size
flexbn lab --quick                  # all of them, small: the same conclusions, noisier numbers
flexbn lab --only nonid --only ghost --seed 0 --out results/
```

| option | meaning |
|---|---|
| `--quick` | smaller versions (fewer epochs, steps, seeds, rates and shapes) |
| `--only NAME` | run only this experiment; repeatable (`--only origin --only detach`) |
| `--seed N` | the random seed (default 2809, the seed of the forum post that started flexbn, [why.md](why.md)) |
| `--out DIR` | where the reports and the PNG figures go (default `./flexbn-lab/`) |
| `--jobs N` | worker processes for the independent training runs (default: the CPU cores, at most 8; `1`: none) |

It writes `report.md`, `report.html` (open it in a browser) and `report.json` (every number, for your own
plots) beside the figures. Progress goes to stderr: a line as each experiment starts, and progress bars on a
terminal.

{timing}

**Same seed, same numbers.** Every process of the lab runs torch on one thread (the caller's thread count is
restored afterwards), and every training run seeds its own generators; so a seed gives the same numbers on a
machine whatever its thread count and `--jobs` — `speed`'s timings aside. (With several threads, torch's
matrix products and flexbn's C++ kernels split their sums by thread, and the rounding changes with the
thread count; the lab's models are small enough that one thread is also the fastest.) Other CPUs, or other
versions of torch, may round differently.

**Requirements.** Everything runs on the CPU, with no download: the training experiments use
scikit-learn's 8×8 digits (1797 images shipped inside scikit-learn), split into 1437 training and 360
held-out images by the seed. The figures, the data and the progress bars come from the optional extras,
`pip install 'flexbn[lab]'` (matplotlib, scikit-learn, tqdm). Without matplotlib the figures are skipped
with a note; without scikit-learn the three digits experiments (`nonid`, `dropout`, `ghost`) are skipped
with a note and the others run; without tqdm there are no progress bars.

## The results

From `flexbn lab`: {description}{partial} The figures are in `docs/figures/`.

"""

TAIL = """
## Adding an experiment

An experiment is a module `flexbn/lab/<name>.py` with `run(seed, *, quick=False, out=None) -> Result`,
registered with a one-line summary in `flexbn.lab.SUMMARIES`. `Result` holds the title, `about` (the
question and the setup, in Markdown), a plain-text table, the conclusion (one line, derived from the
measured numbers, with "FAILED: ..." when the effect is not there), `ok`, the figure paths
(`flexbn.lab._common.save_figure`: matplotlib's object API on the Agg canvas, no pyplot, the lab's style)
and `data`, the numbers the conclusion quotes. Independent training runs go through
`flexbn.lab._common.map_jobs`, which hands them to the worker processes; each must seed itself.
`tests/test_lab_experiments.py` runs the quick lab once and checks each experiment's conclusion against its
`data`. To refresh this page: `{command}` (or `{command} --only NAME`).
"""


def page(report: Report, data: dict[str, Any]) -> str:
    """``docs/lab.md``: the static head, the results rendered from the report, the tail."""
    from flexbn.lab.report import describe

    partial = ""
    if data.get("partial"):
        names = ", ".join(f"`{n}`" for n in data["partial"])
        partial = f" — {names} rerun alone since (`{COMMAND} --only`)."
    else:
        partial = "."
    head = HEAD.format(
        command=COMMAND,
        timing=_wrap(f"**Timing.** {_timing_sentence(data)}."),
        description=describe(report).rstrip("."),
        partial=partial,
    )
    body = markdown(report, DOCS, heading=3, title=None)
    return head + body + TAIL.format(command=COMMAND)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        choices=list(EXPERIMENTS),
        metavar="NAME",
        help=f"rerun only this experiment (repeatable): {', '.join(SUMMARIES)}",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only render docs/lab.md and the README's paragraphs from docs/figures/lab.json",
    )
    args = parser.parse_args(argv)
    if args.render:
        render()
    else:
        regenerate(args.only or [])
    print(
        f"wrote {PAGE.relative_to(ROOT)}, {DATA.relative_to(ROOT)} and README.md's lab paragraphs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
