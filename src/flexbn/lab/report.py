"""The lab's reports: one run of ``flexbn lab`` as JSON (``report.json``, every number), Markdown
(``report.md``) and HTML (``report.html``, open it in a browser), all three written from one
:class:`Report`.

``report.json`` holds what the other two show, so a page can be rendered again from a saved run (the
documentation's ``docs/lab.md`` is: ``python benchmarks/lab_docs.py``).
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import SUMMARIES, Result


@dataclass(frozen=True)
class Report:
    """One run of the lab: how it ran, and each experiment's :class:`~flexbn.lab.Result` and seconds."""

    seed: int
    quick: bool
    results: Mapping[str, Result]
    seconds: Mapping[str, float]
    total: float
    jobs: int = 1
    notes: tuple[str, ...] = ()
    environment: Mapping[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "quick run (--quick)" if self.quick else "full run"

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON data (figure paths as file names)."""
        return {
            "seed": self.seed,
            "quick": self.quick,
            "jobs": self.jobs,
            "total_seconds": self.total,
            "notes": list(self.notes),
            "environment": dict(self.environment),
            "experiments": [
                {
                    "name": name,
                    "title": r.title,
                    "about": r.about,
                    "table": r.table,
                    "conclusion": r.conclusion,
                    "ok": r.ok,
                    "figures": [Path(f).name for f in r.figures],
                    "seconds": self.seconds.get(name),
                    "data": r.data,
                }
                for name, r in self.results.items()
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], figures: Path) -> Report:
        """The report of :meth:`to_json`'s ``data``, its figures in the directory ``figures``.

        >>> r = Report(1, True, {"x": Result("T", "t", "c", True, about="a")}, {"x": 2.0}, 3.0)
        >>> Report.from_json(r.to_json(), Path(".")) == r
        True
        """
        results, seconds = {}, {}
        for e in data["experiments"]:
            results[e["name"]] = Result(
                title=e["title"],
                table=e["table"],
                conclusion=e["conclusion"],
                ok=e["ok"],
                figures=tuple(figures / f for f in e["figures"]),
                data=e["data"],
                about=e["about"],
            )
            if e["seconds"] is not None:
                seconds[e["name"]] = e["seconds"]
        return cls(
            seed=data["seed"],
            quick=data["quick"],
            results=results,
            seconds=seconds,
            total=data["total_seconds"],
            jobs=data["jobs"],
            notes=tuple(data["notes"]),
            environment=data["environment"],
        )


def write(report: Report, out: Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out`` (where the figures are)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "report.html"]
    paths[0].write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(report, out), encoding="utf-8")
    paths[2].write_text(to_html(report, out), encoding="utf-8")
    return paths


def describe(report: Report) -> str:
    """How the run ran, in one sentence (versions, machine, threads, jobs, time, load)."""
    env = report.environment
    parts = [f"seed {report.seed}; {report.mode}"]
    if env:
        parts.append(f"flexbn {env.get('flexbn')}, torch {env.get('torch')}")
        machine = f"{env.get('cpu')}, {env.get('cores')} cores" if env.get("cpu") else ""
        if machine:
            parts.append(machine)
    parts.append(f"one torch thread per process, {report.jobs} worker process(es)")
    load = env.get("load")
    timing = f"{report.total:.0f} s for the experiments"
    if load:
        timing += f" (load average {load[0]:.1f} before, {load[1]:.1f} after)"
    parts.append(timing)
    return "; ".join(parts) + "."


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _figure_path(fig: Path, base: Path) -> str:
    return Path(os.path.relpath(fig, base)).as_posix()


def markdown(
    report: Report, base: Path, *, heading: int = 2, title: str | None = "flexbn lab"
) -> str:
    """The report as Markdown, figure links relative to ``base``: a summary table, then per experiment its
    question and setup, figures, table and conclusion. ``heading``: the level of the experiments'
    headings; ``title=None`` leaves out the title and the run's description."""
    h = "#" * heading
    parts = []
    if title is not None:
        parts.append(f"{'#' * (heading - 1)} {title}\n\n{_capital(describe(report))}\n")
    parts += [f"> {note}\n" for note in report.notes]
    rows = "".join(
        f"\n| [`{name}`](#{name}) | {SUMMARIES.get(name, r.title)} | "
        f"{'ok' if r.ok else '**FAILED**'} | {_seconds(report, name)} |"
        for name, r in report.results.items()
    )
    parts.append(f"| experiment | what it shows | verdict | time |\n|---|---|---|---|{rows}\n")
    for name, r in report.results.items():
        status = "" if r.ok else " — **FAILED**"
        about = f"{r.about}\n\n" if r.about else ""
        figures = "".join(f"![{r.title}]({_figure_path(f, base)})\n\n" for f in r.figures)
        parts.append(
            f'<a id="{name}"></a>\n\n{h} `{name}`: {r.title}{status}\n\n{about}'
            f"**Result** ({_seconds(report, name)}).\n\n{figures}```text\n{r.table}\n```\n\n"
            f"{r.conclusion}\n"
        )
    return "\n".join(parts)


def _seconds(report: Report, name: str) -> str:
    s = report.seconds.get(name)
    return "" if s is None else f"{s:.1f} s"


# ------------------------------------------------------------------------------------------------ HTML

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.5; color: #222; }
pre { background: #f6f8fa; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
code { background: #f6f8fa; padding: 0 0.2rem; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.2rem 0.6rem; }
img { max-width: 100%; border: 1px solid #eee; }
.failed { color: #b00; font-weight: bold; } .note { color: #555; }
"""


def _inline(text: str) -> str:
    """Inline Markdown (code, bold, italics, links) of ``text`` as HTML, everything else escaped.

    >>> _inline("a `x < 1` and **b** [c](https://e.org)")
    'a <code>x &lt; 1</code> and <strong>b</strong> <a href="https://e.org">c</a>'
    """
    pieces = re.split(r"(`[^`]+`)", text)
    out = []
    for piece in pieces:
        if piece.startswith("`") and piece.endswith("`") and len(piece) > 1:
            out.append(f"<code>{html.escape(piece[1:-1])}</code>")
            continue
        s = html.escape(piece, quote=False)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", s)
        s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', s)
        out.append(s)
    return "".join(out)


def _blocks(text: str) -> str:
    """Paragraphs and ``*``/``-`` bullet lists of Markdown ``text`` as HTML."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if all(re.match(r"\s*[*-] |\s+\S", ln) for ln in lines) and re.match(r"[*-] ", lines[0]):
            items: list[str] = []
            for ln in lines:
                if re.match(r"\s*[*-] ", ln):
                    items.append(re.sub(r"^\s*[*-] ", "", ln))
                else:
                    items[-1] += " " + ln.strip()
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
        else:
            out.append(f"<p>{_inline(' '.join(ln.strip() for ln in lines))}</p>")
    return "\n".join(out)


def to_html(report: Report, base: Path) -> str:
    """The report as one HTML page (figures linked relative to ``base``), the same content as
    :func:`markdown`."""
    rows = "".join(
        f'<tr><td><a href="#{name}"><code>{name}</code></a></td>'
        f"<td>{_inline(SUMMARIES.get(name, r.title))}</td>"
        f"<td>{'ok' if r.ok else '<span class=failed>FAILED</span>'}</td>"
        f"<td>{_seconds(report, name)}</td></tr>"
        for name, r in report.results.items()
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>flexbn lab</title><style>{_CSS}</style></head><body>",
        "<h1>flexbn lab</h1>",
        f"<p>{_inline(_capital(describe(report)))}</p>",
        *(f'<p class="note">{_inline(n)}</p>' for n in report.notes),
        "<table><tr><th>experiment</th><th>what it shows</th><th>verdict</th><th>time</th></tr>",
        rows,
        "</table>",
    ]
    for name, r in report.results.items():
        status = "" if r.ok else ' <span class="failed">FAILED</span>'
        figures = "".join(
            f'<p><img src="{html.escape(_figure_path(f, base))}" alt="{html.escape(r.title)}"></p>'
            for f in r.figures
        )
        parts += [
            f'<h2 id="{name}"><code>{name}</code>: {html.escape(r.title)}{status}</h2>',
            _blocks(r.about) if r.about else "",
            f"<p><strong>Result</strong> ({_seconds(report, name)}).</p>",
            figures,
            f"<pre>{html.escape(r.table)}</pre>",
            f"<p>{_inline(r.conclusion)}</p>",
        ]
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p) + "\n"
