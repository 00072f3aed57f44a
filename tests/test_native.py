"""The C++ kernels: obtained safely (shipped, cached or built, never from a file others could have
written, never a damaged one), and called without crossing the C boundary with anything they cannot take.

Loading is tested in fresh processes (``FLEXBN_KERNELS=runtime`` makes them skip the shipped libraries),
so that a crash inside ``dlopen`` shows as a failed test rather than a dead test run; the library built
once for this module is copied into each test's own cache directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import flexbn
from conftest import assert_close
from flexbn._core import _build, backend, kernels, native
from flexbn._core.segments import WHOLE, Segments

pytestmark = pytest.mark.one_backend  # these tests choose how the kernels are obtained themselves

needs_kernels = pytest.mark.skipif(not backend.cpp_available(), reason="no C++ kernels here")
needs_compiler = pytest.mark.skipif(_build.find_compiler() is None, reason="no C++ compiler")
as_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to give files to another user")

# What a fresh process reports, for each scenario (changes to its environment, tried one after the other
# with the kernels forgotten in between): how it obtained the kernels, and whether batch norm is right
# with them (cpp) and by default (auto), with the warnings auto gave.
PROBE = r"""
import json, os, sys, warnings, torch, flexbn
from flexbn._core import backend, native
x = torch.randn(6, 3, 4, dtype=torch.float64)
# With an option: no flexbn option on a small batch runs torch's own batch norm under auto (no warning due)
opt = {"detach_var": True}
with flexbn.use_backend("reference"):
    ref = flexbn.batch_norm(x, None, None, training=True, **opt)
results = {}
for name, env in json.loads(sys.argv[1]).items():
    os.environ.update(env)
    native._reset()
    backend._log_once.cache_clear()
    out = {"why": native.why_not(), "info": native.build_info(), "backend_info": flexbn.backend_info()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = flexbn.batch_norm(x, None, None, training=True, **opt)
    out["warnings"] = [str(w.message) for w in caught]
    out["auto_close"] = bool(torch.allclose(auto, ref, atol=1e-12))
    if not out["why"]:
        with flexbn.use_backend("cpp"):
            y = flexbn.batch_norm(x, None, None, training=True, **opt)
        out["close"] = bool(torch.allclose(y, ref, atol=1e-12))
    results[name] = out
print(json.dumps(results))
"""


def _env(**changes: str) -> dict[str, str]:
    env = {**os.environ, "FLEXBN_KERNELS": "runtime", "FLEXBN_BACKEND": "auto", **changes}
    env.pop("FLEXBN_BUILD_FLAGS", None)
    return env


def _no_compiler(tmp_path: Path, **changes: str) -> dict[str, str]:
    empty = tmp_path / "no-bin"
    empty.mkdir(exist_ok=True)
    return _env(CXX="", PATH=str(empty), **changes)


def _probe(env: dict[str, str], scenarios: dict[str, dict[str, str]] | None = None) -> Any:
    """Run PROBE in a fresh process: its report, or one per scenario."""
    command = [sys.executable, "-c", PROBE, json.dumps(scenarios or {"": {}})]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit status {done.returncode}:\n{done.stderr}"
    results = json.loads(done.stdout.splitlines()[-1])
    if scenarios is None:
        return {**results[""], "stderr": done.stderr}
    return results


def _unavailable(result: dict[str, Any], reason: str) -> None:
    """The kernels were refused for ``reason``, and auto warned and computed the right thing."""
    assert reason in result["why"], result["why"]
    assert result["backend_info"]["kernels"] == "unavailable"
    assert reason in result["backend_info"]["reason"]
    assert result["backend_info"]["cpu"] == "reference"
    assert result["auto_close"]
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "kernels are unavailable here" in result["warnings"][0]
    assert reason in result["warnings"][0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Three processes started together on an empty cache: the directory and what each reported."""
    if _build.find_compiler() is None:
        pytest.skip("no C++ compiler")
    directory = tmp_path_factory.mktemp("shared") / "flexbn"
    env = _env(FLEXBN_CACHE_DIR=str(directory))
    command = [sys.executable, "-c", PROBE, json.dumps({"": {}})]
    procs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1])[""])
    return directory, results


def _library(directory: Path) -> Path:
    (path,) = directory.glob("kernels-*.so")
    return path


def _copy(built: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> Path:
    """A private cache directory holding the module's build."""
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    so = _library(built[0])
    for path in (so, so.with_suffix(".sha256")):
        shutil.copy2(path, directory / path.name)
    return directory


# -------------------------------------------------------------------------------------------------------
# The run-time build and its cache.


@pytest.mark.slow  # builds the kernels
def test_processes_starting_together_build_once(built) -> None:
    """One process builds (under the lock), the others wait and load its library; the cache directory is
    created private, and its files readable by all and writable by their owner only."""
    directory, results = built
    assert sorted(r["info"]["origin"] for r in results) == ["built", "cached", "cached"]
    assert all(r["close"] and r["auto_close"] and not r["warnings"] for r in results)
    assert {r["info"]["path"] for r in results} == {str(_library(directory))}
    assert all(r["info"]["target"] == "native" for r in results)
    assert all(r["backend_info"]["reason"] == "FLEXBN_KERNELS=runtime" for r in results)
    assert (directory.stat().st_mode & 0o777) == 0o700
    so = _library(directory)
    for path in (so, so.with_suffix(".sha256")):
        assert (path.stat().st_mode & 0o777) == 0o644, path
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted([so.name, so.with_suffix(".sha256").name, so.with_suffix(".lock").name])


def _truncate(directory: Path, so: Path) -> None:
    with open(so, "r+b") as f:
        f.truncate(so.stat().st_size // 2)


def _drop_hash(directory: Path, so: Path) -> None:
    so.with_suffix(".sha256").unlink()


def _open_directory(directory: Path, so: Path) -> None:
    os.chmod(directory, 0o777)


def _open_library(directory: Path, so: Path) -> None:
    os.chmod(so, 0o666)


def _foreign_library(directory: Path, so: Path) -> None:
    os.chown(so, 12345, 12345)


def _foreign_directory(directory: Path, so: Path) -> None:
    os.chown(directory, 12345, 12345)


def _symlink(directory: Path, so: Path) -> None:
    elsewhere = directory.parent / "elsewhere.so"
    so.rename(elsewhere)
    so.symlink_to(elsewhere)


# name: (the library put in the cache: flexbn's build or the planted one, what is done to it, why the
# kernels must then be refused -- "" where the cached build must load)
SCENARIOS = {
    "verified-build": ("built", None, ""),
    "truncated": ("built", _truncate, "is damaged"),
    "no-recorded-hash": ("built", _drop_hash, "has no recorded hash"),
    "not-flexbns": ("planted", None, "is not flexbn's kernel library (it lacks flexbn_last_error)"),
    "cache-writable-by-others": ("planted", _open_directory, "is writable by group and others"),
    "library-writable-by-others": ("planted", _open_library, "is writable by group and others"),
    "library-a-symbolic-link": ("planted", _symlink, "cannot open"),
    "library-of-another-user": ("planted", _foreign_library, "belongs to another user"),
    "cache-of-another-user": ("planted", _foreign_directory, "belongs to another user"),
}
ROOT_ONLY = {"library-of-another-user", "cache-of-another-user"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared library that is not flexbn's: its constructor runs as soon as it is loaded, and leaves a
    mark where ``$FLEXBN_PLANTED_MARK`` says."""
    compiler = _build.find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    directory = tmp_path_factory.mktemp("planted")
    source = directory / "planted.c"
    source.write_text(
        "#include <stdio.h>\n#include <stdlib.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        '  const char* mark = getenv("FLEXBN_PLANTED_MARK");\n'
        '  FILE* f = mark ? fopen(mark, "w") : NULL;\n'
        '  if (f) { fputs("planted code ran\\n", f); fclose(f); }\n'
        "}\n"
        "int flexbn_abi_version(void) { return 2; }\n"
    )
    out = directory / "planted.so"
    subprocess.run(
        [*compiler, "-x", "c", "-shared", "-fPIC", str(source), "-o", str(out)], check=True
    )
    return out


@pytest.fixture(scope="module")
def no_compiler(built, planted: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every scenario's cache, prepared, then tried by one process without a compiler (nothing can be
    rebuilt): its reports, with whether each planted library's code ran."""
    base = tmp_path_factory.mktemp("scenarios")
    so = _library(built[0])
    scenarios, marks = {}, {}
    for name, (library, spoil, _) in SCENARIOS.items():
        if name in ROOT_ONLY and os.getuid() != 0:
            continue
        directory = base / name / "cache"
        directory.mkdir(parents=True, mode=0o700)
        target = directory / so.name
        shutil.copyfile(so if library == "built" else planted, target)
        os.chmod(target, 0o644)  # with the hash someone able to write the directory would record
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        target.with_suffix(".sha256").write_text(digest + "\n")
        if spoil is not None:
            spoil(directory, target)
        marks[name] = base / name / "mark"
        scenarios[name] = {
            "FLEXBN_CACHE_DIR": str(directory),
            "FLEXBN_PLANTED_MARK": str(marks[name]),
        }
    results = _probe(_no_compiler(base), scenarios)
    for name, mark in marks.items():
        results[name]["planted code ran"] = mark.exists()
    return results


def test_cache_needs_no_compiler(no_compiler) -> None:
    """A verified build in the cache is loaded where no compiler exists."""
    result = no_compiler["verified-build"]
    assert result["info"]["origin"] == "cached"
    assert result["close"]
    assert not result["warnings"]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=as_root if name in ROOT_ONLY else ())
        for name, (_, _, reason) in SCENARIOS.items()
        if reason
    ],
)
def test_untrusted_or_damaged_library_is_not_loaded(no_compiler, name: str) -> None:
    """A truncated library (a full disk, a killed copy) crashed every process inside dlopen (SIGBUS); a
    library planted in a cache others can write, or own, ran its code inside the user's process; a valid
    library that is not flexbn's made every call raise AttributeError under auto. Now none is loaded --
    the planted code never runs -- the reason is given, and auto warns and computes the right thing."""
    result = no_compiler[name]
    _unavailable(result, SCENARIOS[name][2])
    if name != "not-flexbns":  # that one is in a trusted place with the right hash: it is opened
        assert not result["planted code ran"]


@pytest.mark.slow  # builds the kernels
@needs_compiler
def test_damaged_library_is_rebuilt(built, tmp_path: Path) -> None:
    directory = _copy(built, tmp_path)
    so = _library(directory)
    _truncate(directory, so)
    result = _probe(_env(FLEXBN_CACHE_DIR=str(directory)))
    assert result["info"]["origin"] == "built"
    assert "rebuilding the CPU kernels" in result["stderr"]
    assert "is damaged" in result["stderr"]
    assert result["close"]
    again = _probe(_no_compiler(tmp_path, FLEXBN_CACHE_DIR=str(directory)))
    assert again["info"]["origin"] == "cached"  # the rebuilt file verifies


@pytest.mark.slow  # builds the kernels
@needs_compiler
def test_killed_build_leaves_no_lasting_temporaries(tmp_path: Path) -> None:
    """A build killed half-way (SIGKILL to the process and its compiler) leaves its temporaries; the next
    build removes them."""
    directory = tmp_path / "cache"
    env = _env(FLEXBN_CACHE_DIR=str(directory))
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, json.dumps({"": {}})], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list(directory.glob("kernels-*.tmp")):
            assert proc.poll() is None, "the process ended before its build could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)  # the compiler at work
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(directory.glob("kernels-*.tmp")), "a killed build leaves its temporaries"
    assert not list(directory.glob("kernels-*.so"))
    result = _probe(env)
    assert result["info"]["origin"] == "built"
    assert result["close"]
    assert not list(directory.glob("*.tmp"))


def test_cache_dir_takes_absolute_paths_only(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A relative XDG_CACHE_HOME put the cache under the working directory; it is ignored now (the XDG
    specification says so), and a relative FLEXBN_CACHE_DIR is refused."""
    monkeypatch.delenv("FLEXBN_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert native.cache_dir() == tmp_path / ".cache" / "flexbn"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dir() == tmp_path / "xdg" / "flexbn"
    monkeypatch.setenv("FLEXBN_CACHE_DIR", "relative/flexbn")
    with pytest.raises(native.Unavailable, match="FLEXBN_CACHE_DIR must be an absolute path"):
        native.cache_dir()
    monkeypatch.setenv("FLEXBN_CACHE_DIR", str(tmp_path / "mine"))
    assert native.cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize(("mode", "refused"), [(0o777, True), (0o1777, False), (0o755, False)])
def test_cache_under_a_directory_anyone_can_write(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: int, refused: bool
) -> None:
    """Anyone could rename a cache away from under a world-writable directory (without the sticky bit
    that /tmp has) and put their own in its place; a new cache directory is private (0700)."""
    parent = tmp_path / "parent"
    parent.mkdir()
    os.chmod(parent, mode)
    monkeypatch.setenv("FLEXBN_CACHE_DIR", str(parent / "flexbn"))
    if refused:
        with pytest.raises(native.Unavailable, match="is writable by everyone"):
            native._safe_cache_dir()
    else:
        directory = native._safe_cache_dir()
        assert (directory.stat().st_mode & 0o777) == 0o700


def test_files_reach_the_disk_before_they_are_renamed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A power cut after the rename must not leave an empty file under the final name: the content is
    fsynced first, and the directory after the rename."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: Path) -> None:
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    tmp = tmp_path / "x.tmp"
    tmp.write_bytes(b"library")
    native._publish(str(tmp), tmp_path / "x.so")
    assert events == [
        ("fsync", str(tmp)),
        ("rename", str(tmp_path / "x.so")),
        ("fsync", str(tmp_path)),
    ]
    assert (tmp_path / "x.so").read_bytes() == b"library"
    assert ((tmp_path / "x.so").stat().st_mode & 0o777) == 0o644


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    """Under a key's lock its temporaries are a dead build's; other builds' only after an hour."""
    names = ["kernels-aaaa.x1.tmp", "kernels-bbbb.x2.tmp", "kernels-bbbb.x3.tmp", "kernels-aaaa.so"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    hours_ago = time.time() - 2 * 3600
    os.utime(tmp_path / "kernels-bbbb.x3.tmp", (hours_ago, hours_ago))
    native._remove_stale(tmp_path, "aaaa")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels-aaaa.so", "kernels-bbbb.x2.tmp"]


def test_build_lock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The lock is exclusive between open files (so between processes), and a holder that never lets go
    makes the kernels unavailable after the timeout instead of hanging."""
    import fcntl

    path = tmp_path / "kernels.lock"
    other = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        with native._file_lock(path), pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on leaving
        monkeypatch.setattr(native, "_LOCK_TIMEOUT", 0.2)
        with (
            pytest.raises(native.Unavailable, match="another process building"),
            native._file_lock(path),
        ):
            pass
    finally:
        os.close(other)


# -------------------------------------------------------------------------------------------------------
# The shipped libraries.

_SHIPPED = {
    t: Path(native.__file__).with_name(_build.shipped_name(t)) for t in _build.install_targets()
}


def _not_shipped() -> str:
    """Why this install has no usable shipped kernels to test, or ``""``."""
    if not all(p.exists() for p in _SHIPPED.values()):
        return "the kernels were not built at install"
    try:
        native._shipped()
    except native.Unavailable as err:  # kernels.cpp edited since the install (make test reinstalls)
        return f"the shipped kernels are not usable: {err}"
    return ""


needs_shipped = pytest.mark.skipif(bool(_not_shipped()), reason=_not_shipped() or "usable")


@needs_shipped
def test_shipped_library_is_the_best_level_here() -> None:
    k = native._shipped()
    assert k.origin == "shipped"
    if _build.install_targets() != [_build.GENERIC]:
        level = ctypes.CDLL(str(_SHIPPED["x86-64"])).flexbn_cpu_level()
        assert k.target == _build.X86_LEVELS[level]
    assert k.path == str(_SHIPPED[k.target])
    if os.environ.get("FLEXBN_KERNELS", "auto") == "auto" and not os.environ.get(
        "FLEXBN_BUILD_FLAGS"
    ):
        assert flexbn.backend_info()["kernels"] == "shipped"
        assert flexbn.backend_info()["target"] == k.target


@needs_shipped
def test_stale_shipped_library_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """An editable install whose kernels.cpp was edited after the build: its libraries are stale."""
    monkeypatch.setattr(native, "_source_id", lambda: "0" * 64)
    with pytest.raises(native.Unavailable, match=r"built from another kernels\.cpp"):
        native._shipped()


@contextlib.contextmanager
def _using(path: Path) -> Iterator[None]:
    """Run the kernels from the library at ``path`` inside the block."""
    lib = ctypes.CDLL(str(path))
    target = native._verify(lib, path, None)
    saved = dict(native._state)
    native._state.clear()
    native._state["kernels"] = native._Kernels(lib, "shipped", str(path), target)
    native._function.cache_clear()
    try:
        yield
    finally:
        native._state.clear()
        native._state.update(saved)
        native._function.cache_clear()


def _everything(x: torch.Tensor, seg: Segments) -> list[torch.Tensor]:
    """Every kernel's results on ``x``: statistics, output, running update and backward."""
    gen = torch.Generator().manual_seed(5)
    c = x.shape[1]
    weight, grad = torch.randn(c, generator=gen, dtype=x.dtype), torch.randn(x.shape, generator=gen)
    rm, rv = torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype)
    y, m = kernels.forward(x, x, weight, None, (rm, rv), 0.1, 1e-5, seg, 0)
    grads = kernels.backward(
        grad.to(x.dtype), x, None, weight, m, 1e-5, seg, None, None, grad_mean=True,
        grad_var=True, needs=(True, True, True, False),
    )  # fmt: skip
    sums = kernels.backward_sums(grad.to(x.dtype), x, m, seg)
    return [*m, y, rm, rv, *(g for g in grads if g is not None), *sums]


@needs_shipped
def test_every_level_computes_the_same_bits() -> None:
    """The library for each x86-64 level gives bit-identical results (fixed lanes per sum, no fused
    multiply-add), in every layout, with masks and segments: which one a machine loads changes speed
    only."""
    if _build.install_targets() == [_build.GENERIC]:
        pytest.skip("one library on this architecture")
    level = ctypes.CDLL(str(_SHIPPED["x86-64"])).flexbn_cpu_level()
    levels = [t for n, t in _build.X86_LEVELS.items() if n <= level]
    assert len(levels) >= 2
    gen = torch.Generator().manual_seed(3)
    ids = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    cases = []
    for dtype in (torch.float32, torch.float64):
        x = (torch.randn(8, 6, 150, generator=gen) * 3 + 40).to(dtype)
        mask = torch.rand(8, 150, generator=gen) > 0.3
        cl = (torch.randn(8, 40, 5, 7, generator=gen) + 7).to(dtype)
        cl = cl.contiguous(memory_format=torch.channels_last)
        cases += [
            (x, WHOLE),
            (x, Segments(ids=ids, num=3, mask=mask)),
            (cl, Segments(mask=torch.rand(8, 5, 7, generator=gen) > 0.3)),
            (cl, Segments(ids=ids, num=3)),
            (torch.randn(300, 33, generator=gen, dtype=dtype), WHOLE),
        ]
    results = {}
    for target in levels:
        with _using(_SHIPPED[target]):
            results[target] = [_everything(x, seg) for x, seg in cases]
    for target in levels[1:]:
        for i, (a, b) in enumerate(zip(results[levels[0]], results[target], strict=True)):
            for u, v in zip(a, b, strict=True):
                assert torch.equal(u, v), f"{target} differs from {levels[0]} in case {i}"


# -------------------------------------------------------------------------------------------------------
# backend_info and the warning.


@needs_kernels
def test_backend_info() -> None:
    info = flexbn.backend_info()
    assert set(info) == {
        "backend",
        "cpu",
        "kernels",
        "path",
        "target",
        "build_seconds",
        "reason",
        "threads",
    }
    assert info["kernels"] in ("shipped", "cached", "built")
    assert Path(info["path"]).is_file()
    assert info["threads"] == torch.get_num_threads()
    with flexbn.use_backend("reference"):
        assert flexbn.backend_info()["cpu"] == "reference"
    with flexbn.use_backend("cpp"):
        assert flexbn.backend_info()["cpu"] == "cpp"


def test_fallback_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto on CPU tensors without the kernels: one UserWarning per process, naming the reason and the
    fix, at the caller's line; explicit cpp raises with the reason."""
    monkeypatch.setattr(native, "_state", {"error": "no C++ compiler found (set $CXX)"})
    monkeypatch.setattr(backend, "_log_once", backend._log_once.__wrapped__)
    with pytest.raises(RuntimeError, match=r"'cpp' is unavailable here: no C\+\+ compiler"):
        flexbn.set_backend("cpp")
    x = torch.randn(5, 3, dtype=torch.float64)
    with flexbn.use_backend("auto"):
        with pytest.warns(
            UserWarning, match=r"unavailable here \(no C\+\+ compiler found"
        ) as caught:
            y = flexbn.batch_norm(x, None, None, training=True, detach_var=True)
        flexbn.batch_norm(x, None, None, training=True, detach_var=True)  # no second warning
    assert len(caught) == 1
    assert "FLEXBN_BACKEND=reference" in str(caught[0].message)
    assert caught[0].filename == __file__
    with flexbn.use_backend("reference"):
        assert_close(y, flexbn.batch_norm(x, None, None, training=True, detach_var=True))
    info = flexbn.backend_info()
    assert (info["cpu"], info["kernels"]) == ("reference", "unavailable")
    assert "no C++ compiler" in info["reason"]


# -------------------------------------------------------------------------------------------------------
# Calling the kernels.


def _valid(name: str) -> list[Any]:
    """A valid argument list for kernel ``name``: (4, 3, 5) float32 input, 2 segments, a mask."""
    n, c, positions, g = 4, 3, 5, 2
    x = torch.randn(n, c, positions)
    ids, mask = torch.tensor([0, 1, 1, 0]), torch.ones(n, positions, dtype=torch.bool)
    geo = [n, c, positions, 0, ids, g, mask, 1]

    def table() -> torch.Tensor:
        return torch.randn(g, c)

    def out() -> torch.Tensor:
        return torch.empty(g, c, dtype=torch.float64)

    def counts() -> torch.Tensor:
        return torch.full((g,), 10.0, dtype=torch.float64)

    def stats() -> list[Any]:
        return [counts(), out(), out().abs()]

    def param() -> torch.Tensor:
        return torch.randn(c)

    return {
        "moments": lambda: [x, *geo, torch.empty(g, dtype=torch.float64), out(), out()],
        "normalize": lambda: [x, torch.empty_like(x), *geo, table(), table(), table(), table()],
        "sums": lambda: [x, x.clone(), table(), *geo, out(), out()],
        "apply": lambda: [table(), x, table(), x, table(), table(), torch.empty_like(x), *geo],
        "normalize_stats": lambda: [x, torch.empty_like(x), *geo, *stats(), g, 1e-5, param(), 1,
                                    param(), 1],
        "backward_sums": lambda: [x, x.clone(), *geo, out(), g, out(), out()],
        "backward": lambda: [x, x.clone(), None, torch.empty_like(x), None, *geo, *stats(), g,
                             1e-5, param(), 1, out(), out(), out(), out(), 1, 1, param(), param(), 1],
        "forward": lambda: [x, x.clone(), torch.empty_like(x), *geo, torch.empty(g, dtype=torch.float64),
                            out(), out(), 1e-5, param(), 1, param(), 1, param(), param().abs(), 1, 0.1,
                            None, 0],
        "backward_local": lambda: [x, x.clone(), None, torch.empty_like(x), None, *geo, *stats(), g,
                                   1e-5, param(), 1, 1, 1, param(), param(), 1],
    }[name]()  # fmt: skip


def _at(name: str, role: str) -> int:
    return native._SPECS[name].index(role)


MUTATIONS = {
    # name: (the argument spoiled (a letter of native._SPECS), how, the error's words)
    "input-float64": ("x", lambda t: t.double(), r"argument 0: expected 60 torch\.float32"),
    "input-short": ("x", lambda t: t[:3], "expected 60 torch.float32 values"),
    "input-not-in-layout": ("x", lambda t: t.transpose(0, 2).contiguous().transpose(0, 2), "in layout 0"),
    "input-on-meta": ("x", lambda t: t.to("meta"), "expected a CPU tensor"),
    "input-missing": ("x", lambda t: None, "expected a tensor, but got None"),
    "output-short": ("y", lambda t: t[:2], "expected 60 torch.float32 values"),
    "ids-short": ("I", lambda t: t[:3], "expected 4 contiguous int64 segment ids"),
    "ids-int32": ("I", lambda t: t.int(), "expected 4 contiguous int64 segment ids"),
    "ids-strided": ("I", lambda t: torch.stack([t, t], 1)[:, 0], "int64 segment ids"),
    "mask-short": ("M", lambda t: t[:, :4], "a contiguous bool mask of 20 values"),
    "mask-float": ("M", lambda t: t.float(), "a contiguous bool mask of 20 values"),
    "table-short": ("t", lambda t: t[:1], "a contiguous table of 6 torch.float32"),
    "table-strided": ("t", lambda t: t.t().contiguous().t(), "a contiguous table of 6"),
    "optional-table-float64": ("T", lambda t: t.double(), "a contiguous table of 6 torch.float32"),
    "sums-float32": ("s", lambda t: t.float(), "a contiguous table of 6 float64"),
    "counts-long": ("n", lambda t: torch.empty(3, dtype=torch.float64), "table of 2 float64"),
    "negative-size": ("N", lambda v: -1, "sizes N, C, L >= 0"),
    "float-size": ("C", lambda v: 3.0, "sizes N, C, L >= 0"),
    "no-threads": ("h", lambda v: 0, "threads >= 1"),
    "layout-2": ("l", lambda v: 2, r"layout 0 \(NCL\) or 1 \(NLC\)"),
}  # fmt: skip


@needs_kernels
@pytest.mark.parametrize(
    ("kernel", "mutation"),
    [
        (k, m)
        for k, spec in native._SPECS.items()
        for m, (role, *_) in MUTATIONS.items()
        if role in spec
    ],
)
def test_call_checks_what_the_kernels_rely_on(kernel: str, mutation: str) -> None:
    """Every precondition the C side trusts is checked before the call: a ValueError naming the argument,
    the expected and the received, instead of a read or write out of bounds."""
    native.call(kernel, torch.float32, *_valid(kernel))  # the valid arguments are valid
    role, spoil, words = MUTATIONS[mutation]
    args = _valid(kernel)
    at = native._SPECS[kernel].index(role)
    args[at] = spoil(args[at])
    with pytest.raises(ValueError, match=words):
        native.call(kernel, torch.float32, *args)


@needs_kernels
def test_call_checks_arity_dtype_and_pairs() -> None:
    with pytest.raises(TypeError, match="takes 12 arguments, got 11"):
        native.call("moments", torch.float32, *_valid("moments")[:-1])
    with pytest.raises(ValueError, match=r"expected float32 or float64, but got torch\.float16"):
        native.call("moments", torch.float16, *_valid("moments"))
    args = _valid("apply")
    args[1] = None  # a coefficient without its tensor
    with pytest.raises(ValueError, match="a and u come together"):
        native.call("apply", torch.float32, *args)


@needs_kernels
def test_c_side_refuses_what_it_can_check() -> None:
    """Below the Python checks, the entry points refuse null pointers, negative sizes, unknown layouts
    and out-of-range segment ids themselves, with a code and a message (no crash)."""
    lib = native.library()
    x = torch.randn(4, 3, 5)
    count, mean, m2 = (
        torch.empty(1, dtype=torch.float64),
        *torch.empty(2, 1, 3, dtype=torch.float64),
    )
    outs = (count.data_ptr(), mean.data_ptr(), m2.data_ptr())
    assert lib.flexbn_moments_f32(x.data_ptr(), 4, 3, 5, 0, None, 1, None, 1, *outs) == 0
    assert lib.flexbn_moments_f32(x.data_ptr(), 4, 3, 5, 7, None, 1, None, 1, *outs) == -4
    assert b"invalid arguments" in lib.flexbn_last_error()
    assert lib.flexbn_moments_f32(None, 4, 3, 5, 0, None, 1, None, 1, *outs) == -4
    assert lib.flexbn_moments_f32(x.data_ptr(), -4, 3, 5, 0, None, 1, None, 1, *outs) == -4
    ids = torch.tensor([0, 1, 0, 1])
    assert lib.flexbn_moments_f32(x.data_ptr(), 4, 3, 5, 0, ids.data_ptr(), 1, None, 1, *outs) == -1
    assert b"segment ids" in lib.flexbn_last_error()


@needs_kernels
@pytest.mark.parametrize(
    ("code", "error", "words"),
    [
        (-1, ValueError, r"segment ids must lie in \[0, number of segments\)"),
        (-2, MemoryError, "flexbn's kernels"),
        (-3, RuntimeError, r"kernels failed \(code -3\)"),
        (-4, RuntimeError, "refused their arguments"),
    ],
)
def test_error_codes_become_exceptions(code: int, error: type[Exception], words: str) -> None:
    exc = native._error(code)
    assert type(exc) is error
    assert re.search(words, str(exc))


OUT_OF_MEMORY = r"""
import resource, torch
from flexbn._core import native
torch.set_num_threads(2)

def arguments(segments):
    n, c = 4096, 256  # (N, C): row-split threads, each with (segments, C) private tables
    x = torch.randn(n, c)
    ids = torch.arange(n) % segments
    outs = [torch.empty(segments, dtype=torch.float64), torch.empty(segments, c, dtype=torch.float64)]
    outs.append(torch.empty(segments, c, dtype=torch.float64))
    return [x, n, c, 1, 1, ids, segments, None, 2, *outs]

native.call("moments", torch.float32, *arguments(4))  # the OpenMP team exists
args = arguments(2048)  # 4 MiB tables per thread
with open("/proc/self/statm") as f:
    used = int(f.read().split()[0]) * resource.getpagesize()
limit = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 20), limit[1]))
try:
    native.call("moments", torch.float32, *args)
    print("no error")
except MemoryError as err:
    print("MemoryError:", err)
resource.setrlimit(resource.RLIMIT_AS, limit)
native.call("moments", torch.float32, *args)
print("recovered")
"""


@needs_kernels
@pytest.mark.skipif(
    "asan" in os.environ.get("LD_PRELOAD", ""), reason="ASan reserves the address space"
)
def test_out_of_memory_in_a_thread_raises_memoryerror() -> None:
    """std::bad_alloc for a thread's work tables, inside an OpenMP region, terminated the process
    (SIGABRT); now it is a MemoryError, and the next call works."""
    done = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY], capture_output=True, text=True, timeout=120,
        env={**os.environ, "FLEXBN_BACKEND": "cpp"},
    )  # fmt: skip
    assert done.returncode == 0, f"exit status {done.returncode}:\n{done.stderr}"
    assert done.stdout.splitlines() == [
        "MemoryError: flexbn's kernels: out of memory for the kernels' work tables",
        "recovered",
    ]


@needs_kernels
@pytest.mark.parametrize("layout", ["NCL", "channels_last", "NC"])
def test_mask_bytes_other_than_one_are_true(layout: str) -> None:
    """A bool mask viewed from bytes that are not 0/1 (e.g. uint8 data) gave wrong statistics on the
    kernels: every nonzero byte is True, as torch reads it."""
    gen = torch.Generator().manual_seed(11)
    shape = {"NCL": (6, 5, 40), "channels_last": (6, 5, 4, 10), "NC": (80, 5)}[layout]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).requires_grad_()
    if layout == "channels_last":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    values = torch.tensor([0, 1, 2, 3, 128, 254, 255], dtype=torch.uint8)
    mask_shape = (shape[0], *shape[2:])
    raw = values[torch.randint(0, len(values), mask_shape, generator=gen)]
    raw.view(-1)[:4] = 1
    odd = raw.view(torch.bool)
    clean = raw != 0
    assert (raw > 1).any()  # the mask does hold such bytes
    weight = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    results = []
    for which, mask in (("cpp", odd), ("cpp", clean), ("reference", clean)):
        rm, rv = (
            torch.zeros(shape[1], dtype=torch.float64),
            torch.ones(shape[1], dtype=torch.float64),
        )
        with flexbn.use_backend(which):
            y = flexbn.batch_norm(x, rm, rv, weight, None, training=True, momentum=1.0, mask=mask)
        results.append((y, rm, rv, *torch.autograd.grad(y, (x, weight), grad)))
    for odd_bytes, clean_bytes, reference in zip(*results, strict=True):
        assert torch.equal(odd_bytes, clean_bytes)  # the same kernels see the same mask
        assert_close(odd_bytes, reference)
