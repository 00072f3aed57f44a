"""The ``cpp`` backend: hand-written C++/OpenMP kernels (``kernels.cpp``) for CPU tensors.

The core's three hot functions -- ``stats.moments``, ``autograd.normalize`` and
``autograd.backward_formula`` -- each become one or two passes over the input, for every statistics set
(whole batch, mask, bags, ghost batches, domains) and gradient mode, in every memory layout: contiguous
input is reduced row by row, channels_last and ``(N, C)`` input with the channels as the vector lanes.
Statistics are sums of deviations from a shift kept near each mean, merged in float64 with Chan's formulas
(``kernels.cpp`` notes, ``docs/numerics.md``): one read of the input, and no cancellation however large
the mean. The library shares torch's OpenMP runtime (the same ``libgomp``) and uses
``torch.get_num_threads()`` threads.

The library is compiled once per machine and source version with the system C++ compiler (``$CXX``, else
``g++``/``c++``/``clang++``; 2 to 3 s) into ``$FLEXBN_CACHE_DIR`` (default ``~/.cache/flexbn``) and loaded
from there by every later process; :func:`build_info` says where and how long the build took. float16 and
bfloat16 input is upcast to float32 first, as the reference does.
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
from torch import Tensor

from . import stats

_log = logging.getLogger("flexbn")
_SOURCE = Path(__file__).with_name("kernels.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_P = ctypes.c_void_p
_I = ctypes.c_int64
_GEO = [_I, _I, _I, ctypes.c_int, _P, _I, _P, ctypes.c_int]
_SIGNATURES = {
    "moments": [_P, *_GEO, _P, _P, _P],
    "normalize": [_P, _P, *_GEO, _P, _P, _P, _P],
    "sums": [_P, _P, _P, *_GEO, _P, _P],
    "apply": [_P, _P, _P, _P, _P, _P, _P, *_GEO],
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


# -------------------------------------------------------------------------------------------------------
# Geometry: how a tensor is laid out for the kernels.


class _Geo:
    """The kernels' view of a batch: layout, sizes, segment ids and mask (kept alive with the call)."""

    def __init__(self, x: Tensor, seg: stats.Segments) -> None:
        n, c = x.shape[0], x.shape[1]
        self.n, self.c = n, c
        self.l = x.numel() // (n * c)
        if x.dim() == 2:
            self.layout, self.format = 1, torch.contiguous_format
        elif (
            x.dim() in (4, 5)
            and not x.is_contiguous()
            and x.is_contiguous(
                memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            )
        ):
            self.layout = 1
            self.format = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        else:
            self.layout, self.format = 0, torch.contiguous_format
        self.ids = None if seg.ids is None else seg.ids.to(torch.int64).contiguous()
        self.g = 1 if seg.ids is None else int(seg.num)
        self.mask = None
        if seg.mask is not None:
            self.mask = seg.mask.reshape(n, self.l).to(torch.bool).contiguous()

    def like(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``t`` in the kernels' dtype and this layout (a copy only where needed)."""
        return t.to(dtype).contiguous(memory_format=self.format)

    def args(self) -> list[Any]:
        return [
            self.n,
            self.c,
            self.l,
            self.layout,
            _ptr(self.ids),
            self.g,
            _ptr(self.mask),
            torch.get_num_threads(),
        ]

    def elementwise(self) -> tuple[list[Any], int]:
        """Geometry arguments for the elementwise kernels, and how many times per-channel tables must
        be tiled for them: channels-last rows of one segment and no mask are independent of their row,
        so ``k`` consecutive rows are handed over as one row of ``k * C`` values (the kernels' per-row
        work then covers at least ~1024 values)."""
        rows = self.n * self.l
        if self.layout != 1 or self.ids is not None or self.mask is not None or self.c >= _WIDE:
            return self.args(), 1
        k = max(d for d in range(1, _WIDE // self.c + 1) if rows % d == 0)
        return [rows // k, self.c * k, 1, 1, None, 1, None, torch.get_num_threads()], k

    def param(self, t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """A per-channel ``(C,)`` or per-segment ``(G, C)`` value as a contiguous ``(G, C)`` table."""
        if t is None:
            return None
        if self.g == 1 and t.dim() == 1 and t.dtype == dtype and t.is_contiguous():
            return t  # a (C,) table already is a contiguous (1, C) one
        return t.to(dtype).expand(self.g, self.c).contiguous()


_PLAIN = (Tensor, torch.nn.Parameter)
_WIDE = 1024  # values per row the elementwise kernels are given at least, where rows can be merged


def _tiled(t: Tensor | None, k: int) -> Tensor | None:
    """A ``(1, C)`` table repeated for ``k`` merged rows: ``(1, k * C)``."""
    return t if t is None or k == 1 else t.reshape(1, -1).repeat(1, k)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@functools.cache
def _function(name: str, dtype: torch.dtype) -> Any:
    return getattr(library(), f"flexbn_{name}_{_SUFFIX[dtype]}")


def _call(name: str, dtype: torch.dtype, *args: Any) -> None:
    if _function(name, dtype)(*args) != 0:
        raise ValueError("segment ids must lie in [0, number of segments)")


def supports(*tensors: Tensor) -> bool:
    """Whether the kernels take a call on these tensors (the input first): all on the CPU, strided, plain
    tensors or parameters (not subclasses such as fake or functorch tensors, nor negated views), the input
    floating point and not empty."""
    if not tensors or not tensors[0].is_floating_point() or tensors[0].numel() == 0:
        return False
    for t in tensors:
        if not t.is_cpu or type(t) not in _PLAIN or t.layout is not torch.strided:
            return False
        if t.is_neg() or t.is_conj():  # lazily negated views: their memory is not their value
            return False
    return True


# -------------------------------------------------------------------------------------------------------
# The three core functions.


def moments(x: Tensor, seg: stats.Segments = stats.WHOLE) -> stats.Moments:
    """:func:`stats.moments` on the kernels: ``shift`` is the float64 mean rounded to the compute dtype,
    ``delta`` the rounding residual."""
    cdt = stats.compute_dtype(x.dtype)
    geo = _Geo(x, seg)
    xk = geo.like(x, cdt)
    count = torch.empty(geo.g, dtype=torch.float64)
    mean = torch.empty(geo.g, geo.c, dtype=torch.float64)
    m2 = torch.empty(geo.g, geo.c, dtype=torch.float64)
    _call(
        "moments", cdt, xk.data_ptr(), *geo.args(), count.data_ptr(), mean.data_ptr(), m2.data_ptr()
    )
    shift = mean.to(cdt)
    delta = (mean - shift.double()).to(cdt)
    var = (m2 / count.clamp_min(1).unsqueeze(1)).to(cdt)
    if seg.ids is None:
        shift, delta, var = shift[0], delta[0], var[0]
    return stats.Moments(shift, delta, var)


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    shift: Tensor,
    delta: Tensor | None,
    invstd: Tensor,
    seg: stats.Segments = stats.WHOLE,
) -> Tensor:
    """:func:`autograd.normalize` on the kernels: one pass, ``((x - shift) - delta) * scale + bias``."""
    cdt = stats.compute_dtype(x.dtype)
    geo = _Geo(x, seg)
    xk = geo.like(x, cdt)
    scale = invstd if weight is None else invstd * weight
    flat, tile = geo.elementwise()
    tables = [_tiled(geo.param(t, cdt), tile) for t in (shift, delta, scale, bias)]
    y = torch.empty_like(xk, memory_format=geo.format)
    _call("normalize", cdt, xk.data_ptr(), y.data_ptr(), *flat, *map(_ptr, tables))
    return y.to(x.dtype)


def backward_formula(
    x: Tensor,
    z: Tensor | None,
    grad_out: Tensor,
    weight: Tensor | None,
    shift: Tensor,
    delta: Tensor | None,
    invstd: Tensor,
    *,
    grad_mean: bool,
    grad_var: bool,
    bias_per_segment: bool = False,
    var_mean: Tensor | None = None,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    seg: stats.Segments = stats.WHOLE,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`autograd.backward_formula` on the kernels: one pass of sums over ``dy`` and ``x``, then one
    pass writing each gradient, ``a * dy + keep * (b * (source - shift) + d)`` with per-(segment, channel)
    coefficients formed here in float64."""
    from . import sync
    from .autograd import _memory_format

    if var_mean is not None:  # the backward is being differentiated: the reference builds the graph
        return NotImplemented
    need_input, need_weight, need_bias, need_z = needs
    cdt = stats.compute_dtype(x.dtype)
    geo = _Geo(x, seg)
    xk, gk = geo.like(x, cdt), geo.like(grad_out, cdt)
    need_stats = need_input if z is None else need_z
    need_sum_gxmu = need_weight or (need_stats and grad_var)
    need_sum_g = need_bias or (need_stats and grad_mean) or (need_sum_gxmu and delta is not None)
    synced = seg.group is not None and (grad_mean or grad_var)
    shift_t = geo.param(shift, cdt)
    sum_g = sum_gxmu = local_g = local_gxmu = None
    if need_sum_g or need_sum_gxmu or synced:
        sg = torch.empty(geo.g, geo.c, dtype=torch.float64)
        sgx = torch.empty_like(sg)
        args = [gk.data_ptr(), xk.data_ptr(), _ptr(shift_t), *geo.args()]
        _call("sums", cdt, *args, sg.data_ptr(), sgx.data_ptr())
        if delta is not None:
            sgx = sgx - delta.double() * sg
        if seg.ids is None:
            sg, sgx = sg[0], sgx[0]
        sum_g = local_g = sg
        sum_gxmu = local_gxmu = sgx
        if synced:  # the weight and bias gradients stay local
            sum_g, sum_gxmu = sync.all_sum(seg.group, sg, sgx)

    count = seg.count(x)
    count = count.double() if isinstance(count, Tensor) else float(count)
    inv = invstd.double()
    scale = inv if weight is None else inv * weight.double()
    k = const = None
    if need_stats and grad_var:
        k = inv * inv * sum_gxmu / count
        if delta is not None:
            const = -delta.double() * k
    if need_stats and grad_mean:
        const = sum_g / count if const is None else const + sum_g / count
    b = None if k is None else geo.param(-scale * k, cdt)
    d = None if const is None else geo.param(-scale * const, cdt)
    a = geo.param(scale, cdt)

    def apply(
        a_: Tensor | None,
        u: Tensor | None,
        b_: Tensor | None,
        v: Tensor | None,
        d_: Tensor | None,
        like: Tensor,
    ) -> Tensor:
        out = torch.empty_like(xk, memory_format=geo.format)
        flat, tile = geo.elementwise()
        s_ = shift_t if b_ is not None else None
        args = [_tiled(a_, tile), u, _tiled(b_, tile), v if b_ is not None else None]
        args += [_tiled(s_, tile), _tiled(d_, tile)]
        _call("apply", cdt, *map(_ptr, args), out.data_ptr(), *flat)
        return out.to(like.dtype).contiguous(memory_format=_memory_format(like))

    grad_input = grad_z = None
    if need_input:
        grad_input = apply(a, gk, b, xk, d, x) if z is None else apply(a, gk, None, None, None, x)
    if need_z and z is not None and (b is not None or d is not None):
        grad_z = apply(None, None, b, geo.like(z, cdt), d, z)
    grad_weight = grad_bias = None
    if need_weight and weight is not None:
        grad_weight = seg.total(local_gxmu * inv, per_segment=weight.dim() == 2).to(cdt)
    if need_bias:
        grad_bias = seg.total(local_g, per_segment=bias_per_segment).to(cdt)
    return grad_input, grad_weight, grad_bias, grad_z


IMPLEMENTATIONS = {
    "moments": moments,
    "normalize": normalize,
    "backward_formula": backward_formula,
}

__all__ = ["IMPLEMENTATIONS", "Unavailable", "build_info", "cache_dir", "library", "why_not"]
