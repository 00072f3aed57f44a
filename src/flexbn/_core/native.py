"""Obtaining flexbn's CPU kernels (``kernels.cpp``): build, disk cache, loading, and calling them.

The library is compiled once per machine and source version with the system C++ compiler (``$CXX``, else
``g++``/``c++``/``clang++``; 2 to 3 s) into ``$FLEXBN_CACHE_DIR`` (default ``~/.cache/flexbn``) and loaded
from there by every later process; :func:`build_info` says where and how long the build took. The kernels
take raw pointers (no torch headers); ``flexbn._core.kernels`` lays tensors out for them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

_log = logging.getLogger("flexbn")
_SOURCE = Path(__file__).with_name("kernels.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_P = ctypes.c_void_p
_I = ctypes.c_int64
_D = ctypes.c_double
_C = ctypes.c_int
_GEO = [_I, _I, _I, ctypes.c_int, _P, _I, _P, ctypes.c_int]
_SIGNATURES = {
    "moments": [_P, *_GEO, _P, _P, _P],
    "normalize": [_P, _P, *_GEO, _P, _P, _P, _P],
    "sums": [_P, _P, _P, *_GEO, _P, _P],
    "apply": [_P, _P, _P, _P, _P, _P, _P, *_GEO],
    # The operations on the statistics currency (kernels.py).
    "normalize_stats": [_P, _P, *_GEO, _P, _P, _P, _I, _D, _P, _I, _P, _I],
    "backward_sums": [_P, _P, *_GEO, _P, _I, _P, _P],
    "backward": [
        _P,
        _P,
        _P,
        _P,
        _P,
        *_GEO,
        _P,
        _P,
        _P,
        _I,
        _D,
        _P,
        _I,
        *[_P] * 4,
        _C,
        _C,
        _P,
        _P,
        _I,
    ],
    "running_update": [_P, _P, _I, _I, _I, _P, _P, _P, _D, _P],
    "forward": [_P, _P, _P, *_GEO, _P, _P, _P, _D, _P, _I, _P, _I, _P, _P, _I, _D, _P, _C],
    "backward_local": [_P, _P, _P, _P, _P, *_GEO, _P, _P, _P, _I, _D, _P, _I, _C, _C, _P, _P, _I],
}


class Unavailable(RuntimeError):
    """The kernels cannot be built or loaded here (no compiler, or it failed)."""


def _compiler() -> str | None:
    for name in (os.environ.get("CXX", ""), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def cache_dir() -> Path:
    """Where built kernels are kept: ``$FLEXBN_CACHE_DIR``, else ``$XDG_CACHE_HOME/flexbn`` or
    ``~/.cache/flexbn``."""
    if os.environ.get("FLEXBN_CACHE_DIR"):
        return Path(os.environ["FLEXBN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flexbn"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the processor's feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(compiler: str) -> str:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else compiler


_build: dict[str, Any] = {}


def build_info() -> dict[str, Any]:
    """How the kernels were obtained in this process: ``path``, ``seconds`` (0 when loaded from the
    cache), ``cached`` (bool); empty before first use."""
    return dict(_build)


def _compile(compiler: str, path: Path) -> None:
    """Build the library into ``path``: under a temporary name, then renamed, so that concurrent
    processes never load a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, str(_SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise Unavailable(f"building flexbn's kernels failed ({' '.join(cmd)}):\n{done.stderr}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL:
    """The kernel library, built on first use (cached on disk); raises :class:`Unavailable`."""
    compiler = _compiler()
    if compiler is None:
        raise Unavailable("no C++ compiler found (set $CXX, or install g++ or clang++)")
    start = time.perf_counter()
    try:
        source = _SOURCE.read_bytes()
        parts = [source, " ".join(_FLAGS).encode(), _version(compiler).encode(), _cpu_id().encode()]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
        path = cache_dir() / f"kernels-{key}.so"
        cached = path.exists()
        if not cached:
            _compile(compiler, path)
    except (
        OSError,
        subprocess.SubprocessError,
    ) as err:  # an unwritable cache, a hung compiler, ...
        raise Unavailable(f"building flexbn's kernels failed: {err}") from err
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise Unavailable(f"loading flexbn's kernels from {path} failed: {err}") from err
    for name, argtypes in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            fn = getattr(lib, f"flexbn_{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
    seconds = 0.0 if cached else time.perf_counter() - start
    _build.update(path=str(path), seconds=seconds, cached=cached)
    if not cached:
        _log.info("flexbn: built CPU kernels in %.1f s (%s)", seconds, path)
    return lib


@functools.cache
def why_not() -> str:
    """Why the kernels cannot run here, or ``""``."""
    if sys.platform == "win32":
        return "the cpp backend is built with GCC-style flags, not on Windows"
    try:
        library()
    except Unavailable as err:
        return str(err)
    return ""


@functools.cache
def _function(name: str, dtype: torch.dtype) -> Any:
    return getattr(library(), f"flexbn_{name}_{_SUFFIX[dtype]}")


COUNTS = -2
"""Return code of ``forward``: a segment holds at most one value (nothing but the moments written)."""


def call(name: str, dtype: torch.dtype, *args: Any) -> int:
    """Run ``flexbn_<name>_<dtype>``; raise for an error, return :data:`COUNTS` or 0."""
    rc = _function(name, dtype)(*args)
    if rc == COUNTS:
        return rc
    if rc != 0:
        raise ValueError("segment ids must lie in [0, number of segments)")
    return 0


__all__ = ["Unavailable", "build_info", "cache_dir", "call", "library", "why_not"]
