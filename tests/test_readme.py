"""The documentation is true and runnable: every Python block of ``README.md`` and ``docs/*.md`` runs as
written, the README's API stubs are the library's signatures, and every file or section the documents
link to exists.

A block runs in a fresh namespace, in a temporary directory, after ``torch.manual_seed(0)``. The comment
line just above a block's fence can say how else to check it:

* ``<!-- check: torchrun --nproc-per-node N -->`` -- a script for N processes: run with ``torchrun``;
* ``<!-- check: api -->`` -- stubs (``# module: NAME`` starts a module's part): each ``def`` and ``class``
  must match the object of that name (parameter names, kinds and defaults; a class's bases);
* ``<!-- check: skip REASON -->`` -- not run (for the rare block that cannot be; the reason is shown);
* ``<!-- check: xfail REASON -->`` -- expected to fail: a known bug of the library, kept visible.

Under this test ``torch.compile`` uses the ``aot_eager`` backend: the blocks claim that flexbn is captured
(``fullgraph=True``) and differentiated; Inductor's code generation would add ~30 s per graph on two cores
and is tested in ``tests/test_compile.py``.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import flexbn

pytestmark = pytest.mark.one_backend  # the examples run on the default backend, as a user's would

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)")
CHECK = re.compile(r"^<!--\s*check:\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    """A fenced code block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, 1-based
    heading: str
    language: str
    code: str
    check: str  # the directive above it, or ""

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:40]
        return f"{self.path.relative_to(ROOT)}:{self.line}:{slug}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, with the heading it is under and its check directive."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, heading, i = [], "", 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            if lines[i].startswith("#"):
                heading = lines[i].lstrip("#").strip()
            i += 1
            continue
        fence, language, start = m.group(1), m.group(2), i
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            i += 1
        above = CHECK.match(lines[start - 1].strip()) if start > 0 else None
        code = "\n".join(lines[start + 1 : i]) + "\n"
        found.append(
            Block(path, start + 1, heading, language, code, above.group(1) if above else "")
        )
        i += 1
    return found


ALL = [b for path in DOCUMENTS for b in blocks(path)]
PYTHON = [b for b in ALL if b.language == "python"]


def test_the_examples_are_collected():
    """Not vacuous: the README's examples are all here (one per feature), and each kind of check is."""
    readme = [b for b in PYTHON if b.path.name == "README.md"]
    assert len(readme) >= 13
    assert {b.check.split()[0] for b in readme if b.check} >= {"api", "torchrun"}
    assert any(b.path.parent.name == "docs" for b in PYTHON)


@pytest.mark.parametrize("block", ALL, ids=lambda b: b.id)
def test_python_is_fenced_as_python(block):
    """Python code is never hidden in a ``text`` or unlabelled fence (which no test would run)."""
    if block.language in ("python", "pycon", "bash", "sh", "console"):
        return
    statements = re.findall(
        r"^(?:import \w|from \w+ import |def \w+\(|class \w+)", block.code, re.M
    )
    assert not statements, f"{block.id}: Python code in a ```{block.language} block"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A temporary working directory; flexbn's backend, torch's threads and default dtype restored."""
    monkeypatch.chdir(tmp_path)
    backend, threads, dtype = (
        flexbn.get_backend(),
        torch.get_num_threads(),
        torch.get_default_dtype(),
    )
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch.manual_seed(0)
    yield tmp_path
    flexbn.set_backend(backend)
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


@pytest.mark.filterwarnings(  # raised inside Dynamo when it traces an autograd.Function (torch's own)
    "ignore:.*autograd.function.Function'> should not be instantiated:DeprecationWarning"
)
@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.id)
def test_example_runs(block, isolated):
    kind, _, detail = block.check.partition(" ")
    if kind == "api":
        check_stubs(block.code)
    elif kind == "torchrun":
        script = isolated / "example.py"
        script.write_text(block.code, encoding="utf-8")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                *detail.split(),
                str(script),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, done.stdout + done.stderr
    elif kind == "skip":
        pytest.skip(f"{block.id}: {detail}")
    elif kind == "xfail":
        with pytest.raises(Exception):  # noqa: B017, PT011 -- any failure: the documented bug
            exec(compile(block.code, block.id, "exec"), {"__name__": "__readme__"})
        pytest.xfail(f"{block.id}: {detail}")
    else:
        assert not block.check, f"{block.id}: unknown check {block.check!r}"
        exec(compile(block.code, block.id, "exec"), {"__name__": "__readme__"})


# ------------------------------------------------------------------------------------------- the stubs


def _expected(fn: ast.FunctionDef, drop_first: bool) -> list[tuple[str, str, object]]:
    """(name, kind, default) of each parameter a stub declares."""
    a = fn.args

    def value(node: ast.expr | None) -> object:
        return (
            inspect.Parameter.empty if node is None else eval(ast.unparse(node), {"torch": torch})
        )

    positional = [(p, "POSITIONAL_ONLY") for p in a.posonlyargs]
    positional += [(p, "POSITIONAL_OR_KEYWORD") for p in a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params = [(p.arg, kind, value(d)) for (p, kind), d in zip(positional, defaults, strict=True)]
    if drop_first:
        params = params[1:]
    if a.vararg:
        params.append((a.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
    params += [
        (p.arg, "KEYWORD_ONLY", value(d)) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
    ]
    if a.kwarg:
        params.append((a.kwarg.arg, "VAR_KEYWORD", inspect.Parameter.empty))
    return params


def _actual(obj: object) -> list[tuple[str, str, object]]:
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(obj).parameters.values()]


def check_stubs(code: str, *, complete: bool = True) -> None:
    """Each stub matches the library: functions and methods by signature, classes by their bases;
    ``complete``: every public name of ``flexbn`` has one."""
    parts = re.split(r"^# module: ([\w.]+)[ \t]*$", code, flags=re.M)
    assert not parts[0].strip(), "the stubs must start with '# module: NAME'"
    documented: set[str] = set()
    for name, text in zip(parts[1::2], parts[2::2], strict=True):
        module = importlib.import_module(name)
        for node in ast.parse(text).body:
            where = f"{name}.{getattr(node, 'name', '')}"
            if isinstance(node, ast.FunctionDef):
                assert _actual(getattr(module, node.name)) == _expected(node, False), where
            elif isinstance(node, ast.ClassDef):
                cls = getattr(module, node.name)
                assert inspect.isclass(cls), where
                for base in node.bases:
                    assert issubclass(cls, eval(ast.unparse(base), {"torch": torch})), where
                for method in node.body:
                    if isinstance(method, ast.FunctionDef):
                        target = cls if method.name == "__init__" else getattr(cls, method.name)
                        drop = method.name == "__init__"
                        assert _actual(target) == _expected(method, drop), f"{where}.{method.name}"
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                obj = getattr(module, node.target.id)
                if ast.unparse(node.annotation) == "type":
                    assert inspect.isclass(obj), f"{name}.{node.target.id}"
            else:
                raise AssertionError(f"{name}: unexpected stub {ast.unparse(node)[:60]!r}")
            if name == "flexbn":
                documented.add(
                    ast.unparse(node.target) if isinstance(node, ast.AnnAssign) else node.name
                )
    undocumented = set(flexbn.__all__) - documented - {"BACKENDS", "__version__", "func"}
    missing = f"public names missing from the README's API: {sorted(undocumented)}"
    assert not complete or not undocumented, missing


def test_stub_checker_catches_what_differs():
    """Not vacuous: a stub that differs from the library fails, and so does a missing public name."""
    check_stubs("# module: flexbn\ndef freeze(model) -> Module: ...\n", complete=False)
    stub = "# module: flexbn\ndef set_renorm_limits(model, rmax, dmax=5.0) -> int: ...\n"
    with pytest.raises(AssertionError, match="set_renorm_limits"):  # a default it does not have
        check_stubs(stub, complete=False)
    with pytest.raises(AssertionError, match=r"flexbn\.BatchNorm2d"):  # a wrong base class
        check_stubs("# module: flexbn\nclass BatchNorm2d(torch.nn.Linear): ...\n", complete=False)
    with pytest.raises(AssertionError, match="missing from the README's API"):
        check_stubs("# module: flexbn\ndef freeze(model) -> Module: ...\n")


# ------------------------------------------------------------------------------- what documents cite

# Paths of the project's development notes, which are not part of the repository.
FORBIDDEN = re.compile(r"shared/|research/|\b(?:origin|design|papers|ecosystem|style)\.md\b")
SOURCES = [
    *DOCUMENTS,
    *sorted((ROOT / "src" / "flexbn" / "lab").glob("*.py")),
    ROOT / "src" / "flexbn" / "cli.py",
    ROOT / "src" / "flexbn" / "bench.py",
    *sorted((ROOT / "benchmarks").glob("*.py")),
]


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file: GitHub's heading slugs and explicit ``id``s."""
    text = path.read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([^"]+)"', text))
    inside = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_cites_only_what_the_repository_has(path):
    text = path.read_text(encoding="utf-8")
    assert not FORBIDDEN.findall(text), f"{_relative(path)} cites files outside the repository"
    if path.suffix != ".md":
        return
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{_relative(path)} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{_relative(path)}: no section #{anchor} in {file}"
    for cited in re.findall(r"`((?:src|tests|benchmarks|docs)/[\w./-]+)`", text):
        assert (ROOT / cited).exists(), f"{_relative(path)} cites {cited}, which does not exist"
