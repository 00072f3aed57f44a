"""Obtaining flexbn's CPU kernels (``kernels.cpp``), and calling them without crossing the C boundary
with anything they cannot take.

Where the library comes from, first that works:

1. **shipped**: built at install time (``setup.py``) into the package, one per x86-64 level; the best
   level the processor supports is loaded. No compiler needed. Passed over when it was built from another
   ``kernels.cpp`` than the one beside it (an editable install whose source was edited since), or with
   ``FLEXBN_KERNELS=runtime``.
2. **cached**: built at run time by an earlier process, for this machine (``-march=native``), in
   :func:`cache_dir`. Loaded only from a directory and file that only their owner (or root) can write,
   after checking the file's SHA-256 against the one recorded when it was built; a damaged file is
   rebuilt, never loaded. No compiler needed either.
3. **built** now into that cache with the system C++ compiler, under a lock, so that processes starting
   together build it once; a build killed half-way leaves temporaries that the next build removes.

If none works the kernels are unavailable: ``auto`` runs the reference backend and warns once
(:func:`warn_unavailable`), and :func:`why_not` says why. :func:`backend_info` (``flexbn.backend_info``)
says which kernels run and where they came from.

:func:`call` runs one kernel after checking every precondition the C side relies on (dtypes, devices,
sizes of the input, ids, mask and tables, contiguity in the layout); the C side checks the rest (segment
ids in range, null pointers) and turns any C++ exception into an error code, raised here as
``MemoryError``, ``ValueError`` or ``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shlex
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import _build

_log = logging.getLogger("flexbn")
_SOURCE = _build.SOURCE
_HERE = Path(__file__).parent
ABI_VERSION = 3  # kernels.cpp's flexbn_abi_version(): the entry points and error codes below
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_P = ctypes.c_void_p
_I = ctypes.c_int64
_GEO = [_I, _I, _I, ctypes.c_int, _P, _I, _P, ctypes.c_int]
_D = ctypes.c_double
_C = ctypes.c_int
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
    "forward": [_P, _P, _P, *_GEO, _P, _P, _P, _D, _P, _I, _P, _I, _P, _P, _I, _D, _P, _C],
    "backward_local": [_P, _P, _P, _P, _P, *_GEO, _P, _P, _P, _I, _D, _P, _I, _C, _C, _P, _P, _I],
    "running_update": [_P, _P, _I, _I, _I, _P, _P, _P, _D, _P],
}
_BUILD_TIMEOUT = 600  # seconds a compiler may take
_LOCK_TIMEOUT = 900  # seconds to wait for another process's build
_STALE = 3600  # seconds after which any build's temporaries count as abandoned


class Unavailable(RuntimeError):
    """The kernels cannot be obtained here (none shipped, no compiler, a refused cache, ...)."""


@dataclasses.dataclass
class _Kernels:
    lib: ctypes.CDLL
    origin: str  # "shipped", "cached" or "built"
    path: str
    target: str  # the instruction set it was built for: an x86-64 level, "native" or "generic"
    seconds: float = 0.0  # build time in this process
    notes: list[str] = dataclasses.field(
        default_factory=list
    )  # why earlier sources were passed over


_state: dict[str, Any] = {}  # "kernels": _Kernels, or "error": str -- decided once per process
_first_use = threading.Lock()


def _kernels() -> _Kernels:
    if "kernels" not in _state and "error" not in _state:
        with _first_use:
            if "kernels" not in _state and "error" not in _state:
                try:
                    _state["kernels"] = _obtain()
                except Unavailable as err:
                    _state["error"] = str(err)
    if "error" in _state:
        raise Unavailable(_state["error"])
    return _state["kernels"]


def _reset() -> None:
    """Forget the kernels obtained (tests)."""
    _state.clear()
    _function.cache_clear()


def library() -> ctypes.CDLL:
    """The kernel library, obtained on first use; raises :class:`Unavailable`."""
    return _kernels().lib


def why_not() -> str:
    """Why the kernels cannot run here, or ``""``."""
    try:
        _kernels()
    except Unavailable as err:
        return str(err)
    return ""


def build_info() -> dict[str, Any]:
    """How this process obtained the kernels: ``origin`` (``"shipped"``, ``"cached"`` or ``"built"``),
    ``path``, ``target``, ``seconds`` (of building, 0 unless built here) and ``cached`` (not built
    here); empty before first use or when unavailable."""
    k = _state.get("kernels")
    if k is None:
        return {}
    return {
        "origin": k.origin,
        "path": k.path,
        "target": k.target,
        "seconds": k.seconds,
        "cached": k.origin != "built",
    }


def backend_info() -> dict[str, Any]:
    """Which implementation runs flexbn's batch norms on CPU tensors in this process, and why.

    Obtains the kernels if no call has yet (which may build them: seconds, once per machine). Keys:

    * ``backend``: the selected backend (``flexbn.set_backend``, ``$FLEXBN_BACKEND``, else ``"auto"``);
    * ``cpu``: what that choice runs for CPU tensors, ``"cpp"`` (the C++ kernels), ``"reference"`` or
      ``"compiled"`` (the reference still runs under ``torch.compile``, ``torch.func`` transforms and
      double backward; CUDA tensors run the reference under ``auto``);
    * ``kernels``: where the C++ kernels came from, ``"shipped"`` (built at install time),
      ``"cached"`` (built at run time by an earlier process), ``"built"`` (by this one) or
      ``"unavailable"``;
    * ``path``, ``target`` (``"x86-64-v4"``, ... for shipped kernels, ``"native"`` for run-time builds)
      and ``build_seconds`` of the library loaded (``None`` when unavailable);
    * ``reason``: why the kernels are unavailable, or why a better source was passed over (``""``);
    * ``threads``: the threads the kernels use (``torch.get_num_threads()``).

    >>> import flexbn
    >>> info = flexbn.backend_info()
    >>> info["kernels"] in ("shipped", "cached", "built", "unavailable")
    True
    >>> info["cpu"] == ("cpp" if info["kernels"] != "unavailable" else "reference")
    True
    """
    from .backend import get_backend

    name = get_backend()
    try:
        k: _Kernels | None = _kernels()
        reason = "; ".join(k.notes)  # type: ignore[union-attr]
    except Unavailable as err:
        k, reason = None, str(err)
    cpu = "cpp" if name == "cpp" or (name == "auto" and k is not None) else name
    return {
        "backend": name,
        "cpu": "reference" if cpu == "auto" else cpu,
        "kernels": "unavailable" if k is None else k.origin,
        "path": None if k is None else k.path,
        "target": None if k is None else k.target,
        "build_seconds": None if k is None else k.seconds,
        "reason": reason,
        "threads": torch.get_num_threads(),
    }


def warn_unavailable(reason: str) -> None:
    """Warn, once per process, that CPU batch norms run on the slower reference backend because the
    kernels are unavailable for ``reason``; ``auto`` calls it where it falls back."""
    if _state.get("warned"):
        return
    _state["warned"] = True
    warnings.warn(
        f"flexbn's C++ kernels are unavailable here ({reason}), so CPU batch norms run on the "
        "pure-torch reference backend, several times slower. To get them: install flexbn with a C++ "
        "compiler with OpenMP present (g++), or install one and let flexbn build the kernels at first "
        "use. flexbn.backend_info() says which path runs; FLEXBN_BACKEND=reference chooses the "
        "reference explicitly (no warning).",
        UserWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside flexbn and torch (the user's call)."""
    skip = (str(_HERE.parent), os.path.dirname(torch.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


# -------------------------------------------------------------------------------------------------------
# Obtaining the library.


def _obtain() -> _Kernels:
    if sys.platform == "win32":
        raise Unavailable("the kernels are built with GCC-style flags, not on Windows")
    mode = os.environ.get("FLEXBN_KERNELS", "") or "auto"
    if mode not in ("auto", "runtime"):
        raise Unavailable(f"FLEXBN_KERNELS must be 'auto' or 'runtime', but got {mode!r}")
    extra = tuple(shlex.split(os.environ.get("FLEXBN_BUILD_FLAGS", "")))
    notes = []
    if mode == "runtime" or extra:
        notes.append("FLEXBN_KERNELS=runtime" if mode == "runtime" else "FLEXBN_BUILD_FLAGS is set")
    else:
        try:
            return _shipped()
        except Unavailable as err:
            notes.append(f"no shipped kernels: {err}")
    try:
        k = _runtime(extra)
    except Unavailable as err:
        raise Unavailable("; ".join([*notes, str(err)])) from None
    k.notes = notes
    return k


def _source_id() -> str | None:
    """The SHA-256 of the ``kernels.cpp`` beside this file, ``None`` without one."""
    try:
        return _build.source_id(_SOURCE.read_bytes())
    except OSError:
        return None


def _open(path: Path | str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(os.fspath(path))
    except OSError as err:
        raise Unavailable(f"loading {path} failed: {err}") from err


def _verify(lib: ctypes.CDLL, path: Path | str, source: str | None) -> str:
    """Check that ``lib`` is flexbn's kernels for this version of ``kernels.cpp`` (when ``source`` is
    known) and set up its entry points; returns the target it was built for."""
    try:
        names = ["flexbn_abi_version", "flexbn_last_error", "flexbn_source_id", "flexbn_target"]
        names += [f"flexbn_{name}_{s}" for name in _SIGNATURES for s in _SUFFIX.values()]
        for name in names:
            getattr(lib, name)
    except AttributeError:
        raise Unavailable(f"{path} is not flexbn's kernel library (it lacks {name})") from None
    if lib.flexbn_abi_version() != ABI_VERSION:
        raise Unavailable(f"{path} has interface {lib.flexbn_abi_version()}, not {ABI_VERSION}")
    for name in ("flexbn_last_error", "flexbn_source_id", "flexbn_target"):
        getattr(lib, name).restype = ctypes.c_char_p
    built_from = lib.flexbn_source_id().decode()
    if source is not None and built_from != source:
        raise Unavailable(
            f"{path} was built from another kernels.cpp than the one installed (edited since?)"
        )
    for name, argtypes in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            fn = getattr(lib, f"flexbn_{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib.flexbn_target().decode()


def _shipped() -> _Kernels:
    """The best library built at install time that this processor runs."""
    targets = _build.install_targets()
    present = {t: _HERE / _build.shipped_name(t) for t in targets}
    present = {t: p for t, p in present.items() if p.is_file()}
    if not present:
        raise Unavailable("none were built at install time (was a C++ compiler missing then?)")
    if targets == [_build.GENERIC]:
        target = _build.GENERIC
    else:
        # The baseline library (any x86-64 processor) says which levels this one supports.
        baseline = present.get(_build.X86_LEVELS[1])
        if baseline is None:
            raise Unavailable(f"the baseline library {_build.shipped_name('x86-64')} is missing")
        probe = _open(baseline)
        try:
            level = int(probe.flexbn_cpu_level())
        except AttributeError:
            raise Unavailable(f"{baseline} is not flexbn's kernel library") from None
        fits = [t for n, t in _build.X86_LEVELS.items() if n <= level and t in present]
        if not fits:
            raise Unavailable(f"no shipped library fits this processor (x86-64 level {level})")
        target = fits[0]
    path = present[target]
    lib = _open(path)
    _verify(lib, path, _source_id())
    return _Kernels(lib, "shipped", str(path), target)


def cache_dir() -> Path:
    """Where kernels built at run time are kept: ``$FLEXBN_CACHE_DIR``, else ``$XDG_CACHE_HOME/flexbn``,
    else ``~/.cache/flexbn``. Only absolute paths: a relative ``$FLEXBN_CACHE_DIR`` raises
    :class:`Unavailable`; a relative ``$XDG_CACHE_HOME`` is ignored, as the XDG specification says."""
    env = os.environ.get("FLEXBN_CACHE_DIR", "")
    if env:
        if not os.path.isabs(env):
            raise Unavailable(f"FLEXBN_CACHE_DIR must be an absolute path, but got {env!r}")
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "flexbn"
    home = os.path.expanduser("~")
    if not os.path.isabs(home):
        raise Unavailable("no home directory to keep built kernels in (set FLEXBN_CACHE_DIR)")
    return Path(home) / ".cache" / "flexbn"


def _trusted_owner(st: os.stat_result) -> bool:
    return st.st_uid in (os.getuid(), 0)


def _writable_by_others(st: os.stat_result) -> str:
    """Who besides the owner may write (``"group"``, ``"others"``, ``"group and others"``) or ``""``."""
    who = [w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit]
    return " and ".join(who)


def _safe_cache_dir() -> Path:
    """:func:`cache_dir`, created (mode 0700) if missing, and refused unless only its owner -- this user
    or root -- can write it, and no directory above it is writable by everyone without the sticky bit
    (anyone could rename it away then)."""
    directory = cache_dir()
    try:
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        st = os.stat(directory)
    except OSError as err:
        raise Unavailable(f"cannot create the kernel cache {directory}: {err}") from err
    fix = "set FLEXBN_CACHE_DIR to a directory only you can write"
    if not stat.S_ISDIR(st.st_mode):
        raise Unavailable(f"the kernel cache {directory} is not a directory")
    if not _trusted_owner(st):
        raise Unavailable(
            f"the kernel cache {directory} belongs to another user (uid {st.st_uid}): flexbn loads "
            f"code only from directories you or root own; {fix}"
        )
    who = _writable_by_others(st)
    if who:
        raise Unavailable(
            f"the kernel cache {directory} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o}): "
            f"flexbn does not load code from a directory others can write; {fix}, or chmod go-w it"
        )
    for parent in directory.resolve().parents:
        try:
            up = os.stat(parent)
        except OSError:
            continue
        if up.st_mode & stat.S_IWOTH and not up.st_mode & stat.S_ISVTX:
            raise Unavailable(
                f"{parent}, above the kernel cache {directory}, is writable by everyone: anyone "
                f"could replace the cache; {fix}"
            )
    return directory


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


def _runtime(extra: tuple[str, ...]) -> _Kernels:
    """The library built for this machine: from the cache, else built into it."""
    source = _source_id()
    if source is None:
        raise Unavailable(f"its source {_SOURCE} is missing, so it cannot be built here")
    parts = [source, *_build.FLAGS, _build.NATIVE, *extra, _cpu_id(), str(ABI_VERSION)]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    directory = _safe_cache_dir()
    path = directory / f"kernels-{key}.so"
    loaded, why = _load_cached(path, source)
    if loaded is not None:
        return loaded
    compiler = _build.find_compiler()
    if compiler is None:
        found = f" ({why})" if why else ""
        raise Unavailable(
            f"no C++ compiler found to build them (set $CXX, or install g++ or clang++), and no "
            f"usable build in {directory}{found}"
        )
    with _file_lock(directory / f"kernels-{key}.lock"):
        loaded, _ = _load_cached(path, source)  # built by another process while this one waited
        if loaded is not None:
            return loaded
        if why:
            _log.warning("flexbn: rebuilding the CPU kernels: %s", why)
        _remove_stale(directory, key)
        start = time.perf_counter()
        _compile(compiler, path, extra)
        seconds = time.perf_counter() - start
        loaded, why = _load_cached(path, source)
        if loaded is None:
            raise Unavailable(f"the kernels just built do not load: {why}")
    loaded.origin, loaded.seconds = "built", seconds
    _log.info("flexbn: built the CPU kernels in %.1f s (%s)", seconds, path)
    return loaded


def _check_file(fd: int, path: Path) -> str:
    """Why the open file ``fd`` must not be trusted, or ``""``."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if not _trusted_owner(st):
        return f"{path} belongs to another user (uid {st.st_uid})"
    who = _writable_by_others(st)
    if who:
        return f"{path} is writable by {who}"
    return ""


def _read_checked(path: Path) -> tuple[bytes | None, str]:
    """The content of ``path`` if it is a regular file only its owner (this user or root) can write --
    never through a symbolic link -- else ``None`` and why."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None, ""
    except OSError as err:
        return None, f"cannot open {path}: {err}"
    try:
        problem = _check_file(fd, path)
        if problem:
            return None, problem
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(), ""
    finally:
        os.close(fd)


def _load_cached(path: Path, source: str) -> tuple[_Kernels | None, str]:
    """The library at ``path`` if it can be trusted and is intact, else ``None`` and why (``""``: not
    there)."""
    content, why = _read_checked(path)
    if content is None:
        return None, why
    recorded, why = _read_checked(path.with_suffix(".sha256"))
    if recorded is None:
        return None, why or f"{path} has no recorded hash (an interrupted build, or not flexbn's)"
    if hashlib.sha256(content).hexdigest() != recorded.decode(errors="replace").strip():
        return None, f"{path} is damaged (its content differs from the hash recorded at its build)"
    try:
        lib = _open(path)
        target = _verify(lib, path, source)
    except Unavailable as err:
        return None, str(err)
    return _Kernels(lib, "cached", str(path), target), ""


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) held by this process; released when the
    process ends however it ends."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        raise Unavailable(f"cannot lock the kernel cache ({path}): {err}") from err
    try:
        deadline, said = time.monotonic() + _LOCK_TIMEOUT, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    _log.info("flexbn: waiting for another process building the CPU kernels")
                    said = True
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"waited {_LOCK_TIMEOUT} s for another process building the kernels "
                        f"(it holds {path})"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _remove_stale(directory: Path, key: str) -> None:
    """Remove temporaries of builds that died (a SIGKILL, a power cut): this key's -- its lock is held,
    so no live process is writing them -- and anyone's older than an hour."""
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if not (entry.name.startswith("kernels-") and entry.name.endswith(".tmp")):
                continue
            with contextlib.suppress(OSError):
                old = now - entry.stat(follow_symlinks=False).st_mtime > _STALE
                if entry.name.startswith(f"kernels-{key}.") or old:
                    os.unlink(entry.path)


def _fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(directory: Path, stem: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f"{stem}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return tmp


def _publish(tmp: str, path: Path) -> None:
    """Make the finished temporary ``tmp`` the file ``path``: on disk first (fsync), readable by all and
    writable by its owner only, then renamed in one step, and the rename itself made durable."""
    os.chmod(tmp, 0o644)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)


def _compile(compiler: list[str], path: Path, extra: tuple[str, ...]) -> None:
    """Build the library into ``path`` with its hash beside it (``.sha256``), each written under a
    temporary name and renamed, so that no process ever loads a partial file."""
    tmp = _temporary(path.parent, path.stem)
    sidecar = _temporary(path.parent, path.stem)
    try:
        cmd = _build.command(compiler, _build.NATIVE, tmp, source=_SOURCE, extra=extra)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as err:
            raise Unavailable(f"building the kernels failed ({shlex.join(cmd)}): {err}") from err
        if done.returncode != 0:
            raise Unavailable(f"building the kernels failed ({shlex.join(cmd)}):\n{done.stderr}")
        with open(tmp, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        with open(sidecar, "w", encoding="ascii") as f:
            f.write(digest + "\n")
        _publish(sidecar, path.with_suffix(".sha256"))
        _publish(tmp, path)
    except OSError as err:
        raise Unavailable(f"cannot write the kernels into {path.parent}: {err}") from err
    finally:
        for name in (tmp, sidecar):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


# -------------------------------------------------------------------------------------------------------
# Calling the kernels.

# Each kernel's C arguments, one letter each: x/y an input/output of the batch's N * C * L values in the
# layout, X an optional one; t a (G, C) table in the compute dtype, T an optional one; n the (G,) float64
# counts, s a (G, C) float64 table; w an optional (1 or G, C) table in the compute dtype followed by its
# row count, W an optional output of that shape; r an optional running buffer in the compute dtype, of
# (1 or G) rows; q optional float64 per-row factors; i an int, f a float; then the geometry, GEO: N, C, L,
# layout, ids, G, mask, threads.
_GEO_SPEC = "NCLlIGMh"
_SPECS = {
    "moments": "x" + _GEO_SPEC + "nss",
    "normalize": "xy" + _GEO_SPEC + "tTtT",
    "sums": "xxt" + _GEO_SPEC + "ss",
    "apply": "TXTXTTy" + _GEO_SPEC,
    "normalize_stats": "xy" + _GEO_SPEC + "nssifwiwi",
    "backward_sums": "xx" + _GEO_SPEC + "siss",
    "backward": "xxXYY" + _GEO_SPEC + "nssifwiSSSSiiWWi",
    "forward": "xxy" + _GEO_SPEC + "nssfwiwirrifqi",
    "backward_local": "xxXYY" + _GEO_SPEC + "nssifwiiiWWi",
}
_SCALARS = "NCLlGhif"
_GEO_AT = {name: spec.index("N") for name, spec in _SPECS.items()}
_TENSORS = {
    name: [(i, role) for i, role in enumerate(spec) if role not in _SCALARS]
    for name, spec in _SPECS.items()
}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _bad(name: str, arg: int, what: str, got: Any) -> ValueError:
    return ValueError(f"flexbn kernel {name!r}, argument {arg}: expected {what}, but got {got}")


def _describe(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return repr(t)
    return f"a {t.dtype} tensor of shape {tuple(t.shape)}, strides {t.stride()} on {t.device}"


def _in_layout(t: torch.Tensor, layout: int) -> bool:
    """Whether the kernels' view of ``t`` (``layout`` 0: NCL, 1: NLC) is its memory."""
    if layout == 0 or t.dim() <= 2:
        return t.is_contiguous()
    fmt = _CHANNELS_LAST.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt)


# Per kernel, each tensor argument's position, kind (what its check is: 0 the batch in the layout, 1 a
# table in the compute dtype, 2 a float64 table, 3 a (1 or G, C) parameter or buffer, 4 per-row factors,
# 5 counts, 6 segment ids, 7 a mask), whether it may be None, and its letter.
_KINDS = {"x": 0, "y": 0, "X": 0, "Y": 0, "t": 1, "T": 1, "s": 2, "S": 2, "w": 3, "W": 3, "r": 3}
_KINDS.update({"q": 4, "n": 5, "I": 6, "M": 7})
_CHECKS = {
    name: tuple((i, _KINDS[role], role in "TXIMYwWrqS", role) for i, role in tensors)
    for name, tensors in _TENSORS.items()
}
_F64 = torch.float64


def _arguments(name: str, dtype: torch.dtype, args: tuple[Any, ...]) -> list[Any]:
    """``args`` as the C function takes them (tensors as addresses), after checking everything the C
    side relies on: what they point to must be CPU memory of the right dtype, size and layout (about
    0.5 us per tensor; a batch tensor passed twice, as the input and the statistics' source, is checked
    once)."""
    spec = _SPECS[name]
    if len(args) != len(spec):
        raise TypeError(f"flexbn kernel {name!r} takes {len(spec)} arguments, got {len(args)}")
    at = _GEO_AT[name]
    n, c, positions, layout, ids, groups, _, threads = args[at : at + len(_GEO_SPEC)]
    sizes = (n, c, positions, groups, threads)
    if (
        any(type(v) is not int for v in sizes)
        or min(n, c, positions) < 0
        or min(groups, threads) < 1
    ):
        raise _bad(name, at, "sizes N, C, L >= 0 and G, threads >= 1", sizes)
    if layout != 0 and layout != 1:
        raise _bad(name, at + 3, "layout 0 (NCL) or 1 (NLC)", layout)
    segments = groups if ids is not None else 1
    rows, size, tables = n * positions, n * c * positions, segments * c
    out = list(args)
    # id -> address of the batch tensors checked (the input may also be the statistics' source)
    batch: dict[int, int] = {}
    for i, kind, optional, role in _CHECKS[name]:
        a = args[i]
        if a is None:
            if optional:
                continue
            raise _bad(name, i, "a tensor", None)
        if kind == 0 and id(a) in batch:
            out[i] = batch[id(a)]
            continue
        if not isinstance(a, torch.Tensor) or not a.is_cpu:
            raise _bad(name, i, "a CPU tensor", _describe(a))
        if kind == 0:  # the batch, in the layout
            ok = a.dtype is dtype and a.numel() == size
            ok = ok and (a.is_contiguous() if layout == 0 else _in_layout(a, layout))
        elif kind == 2:
            ok = a.dtype is _F64 and a.numel() == tables and a.is_contiguous()
        elif kind == 3:  # (1 or G, C); a parameter's row count follows it
            numel = a.numel()
            ok = a.dtype is dtype and numel in (c, tables) and a.is_contiguous()
            if ok and role == "w" and args[i + 1] * c != numel:
                raise _bad(name, i + 1, f"the row count of a table of {numel} values", args[i + 1])
        elif kind == 1:
            ok = a.dtype is dtype and a.numel() == tables and a.is_contiguous()
        elif kind == 5:
            ok = a.dtype is _F64 and a.numel() == segments and a.is_contiguous()
        elif kind == 4:
            ok = a.dtype is _F64 and a.numel() in (1, segments) and a.is_contiguous()
        elif kind == 6:
            ok = a.dtype is torch.int64 and a.numel() == n and a.is_contiguous()
        else:  # 7: the mask
            ok = (a.dtype is torch.bool or a.dtype is torch.uint8) and a.numel() == rows
            ok = ok and a.is_contiguous()
        if not ok:
            raise _bad(
                name,
                i,
                _expected(role, dtype, size, tables, segments, n, rows, layout),
                _describe(a),
            )
        out[i] = address = a.data_ptr()
        if kind == 0:
            batch[id(a)] = address
    if name == "apply" and (
        (args[0] is None) != (args[1] is None) or (args[2] is not None and None in args[3:5])
    ):
        raise ValueError("flexbn kernel 'apply': a and u come together, and b needs v and s")
    return out


def _expected(
    role: str,
    dtype: torch.dtype,
    size: int,
    tables: int,
    segments: int,
    n: int,
    rows: int,
    layout: int,
) -> str:
    return {
        "x": f"{size} {dtype} values in layout {layout} ({'NLC' if layout else 'NCL'})",
        "t": f"a contiguous table of {tables} {dtype} values",
        "s": f"a contiguous table of {tables} float64 values",
        "n": f"a contiguous table of {segments} float64 values",
        "I": f"{n} contiguous int64 segment ids",
        "M": f"a contiguous bool mask of {rows} values",
        "w": f"a contiguous table of {tables // max(segments, 1)} or {tables} {dtype} values",
        "q": f"1 or {segments} contiguous float64 values",
    }[{"X": "x", "y": "x", "Y": "x", "T": "t", "S": "s", "W": "w", "r": "w"}.get(role, role)]


@functools.cache
def _function(name: str, dtype: torch.dtype) -> Any:
    return getattr(library(), f"flexbn_{name}_{_SUFFIX[dtype]}")


COUNTS, NONFINITE = 1, 2
"""What ``forward`` returns when its count check finds a segment of at most one value, and when a mean is
not finite (results, not errors: nothing but the statistics was written)."""


def call(name: str, dtype: torch.dtype, *args: Any) -> int:
    """Run kernel ``name`` in ``dtype`` (float32 or float64) on ``args``, its C argument list with tensors
    (or ``None``) for the pointers. Returns 0, or :data:`COUNTS` from ``forward``. Raises ``ValueError`` for
    arguments the kernel cannot take or segment ids out of range, ``MemoryError`` when its work tables
    cannot be allocated, ``RuntimeError`` for any other failure."""
    if dtype not in _SUFFIX:
        raise ValueError(f"flexbn kernel {name!r}: expected float32 or float64, but got {dtype}")
    fn = _function(name, dtype)
    code = fn(*_arguments(name, dtype, args))
    if code in (COUNTS, NONFINITE) and name == "forward":
        return code
    if code != 0:
        raise _error(code)
    return 0


def call_running_update(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    counts: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    momentum: float,
    momentum_rows: torch.Tensor | None,
) -> None:
    """The running update (no batch geometry), after the checks the C side relies on."""
    dtype = running_mean.dtype
    rows, channels = (1, running_mean.numel()) if running_mean.dim() == 1 else running_mean.shape
    segments = counts.numel()
    tables = [counts, mean, m2] + ([] if momentum_rows is None else [momentum_rows])
    ok = (
        dtype in _SUFFIX
        and all(t.is_cpu and t.is_contiguous() for t in (running_mean, running_var, *tables))
        and running_var.dtype is dtype
        and running_var.numel() == running_mean.numel()
        and rows in (1, segments)
        and all(t.dtype is torch.float64 for t in tables)
        and mean.numel() == m2.numel() == segments * channels
        and (momentum_rows is None or momentum_rows.numel() in (1, rows))
    )
    if not ok:
        raise ValueError(
            "flexbn kernel 'running_update': expected contiguous CPU buffers of one float dtype, "
            f"(1 or G, C) rows, float64 tables; got buffers {_describe(running_mean)} and "
            f"{_describe(running_var)}, tables {[_describe(t) for t in tables]}"
        )
    fn = _function("running_update", dtype)
    rows_ptr = None if momentum_rows is None else momentum_rows.data_ptr()
    code = fn(
        running_mean.data_ptr(),
        running_var.data_ptr(),
        rows,
        channels,
        segments,
        counts.data_ptr(),
        mean.data_ptr(),
        m2.data_ptr(),
        float(momentum),
        rows_ptr,
    )
    if code != 0:
        raise _error(code)


def _error(code: int) -> Exception:
    message = (library().flexbn_last_error() or b"").decode(errors="replace")
    if code == -1:
        return ValueError("segment ids must lie in [0, number of segments)")
    if code == -2:
        return MemoryError(f"flexbn's kernels: {message}")
    if code == -4:
        return RuntimeError(f"flexbn's kernels refused their arguments: {message} (a flexbn bug)")
    return RuntimeError(f"flexbn's kernels failed (code {code}): {message}")


__all__ = [
    "ABI_VERSION",
    "COUNTS",
    "NONFINITE",
    "Unavailable",
    "backend_info",
    "build_info",
    "cache_dir",
    "call",
    "call_running_update",
    "library",
    "warn_unavailable",
    "why_not",
]
