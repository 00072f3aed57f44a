"""How flexbn's C++ kernels are compiled: shared by ``setup.py`` (at install) and ``native`` (the run-time
fallback), so that both build the same thing the same way.

Standard library only: ``setup.py`` loads this file by path, before flexbn or torch can be imported.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.cpp")

# -ffp-contract=off: no fused multiply-adds, whatever the instruction set, so that the libraries built for
# each level compute the same results (kernels.cpp keeps its summation order independent of the vector
# width too).
FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")

# The x86-64 levels a library is built for at install time, best first; the loader takes the best one
# the processor supports. "x86-64" (SSE2) runs on every x86-64 processor.
X86_LEVELS = {4: "x86-64-v4", 3: "x86-64-v3", 2: "x86-64-v2", 1: "x86-64"}
GENERIC = "generic"  # other architectures: the compiler's default target
NATIVE = "native"  # the run-time build: this machine's instruction set


def install_targets() -> list[str]:
    """The targets a wheel or an install ships a library for, on this architecture."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return list(X86_LEVELS.values())
    return [GENERIC]


def shipped_name(target: str) -> str:
    """The file name of the library built at install time for ``target``, in the package."""
    return f"_kernels-{target}.so"


def source_id(source: bytes) -> str:
    """What a library records of the source it was built from (its SHA-256)."""
    return hashlib.sha256(source).hexdigest()


def find_compiler() -> list[str] | None:
    """The C++ compiler command: ``$CXX`` (which may carry a launcher, e.g. ``ccache g++``), else
    ``g++``, ``c++`` or ``clang++`` on the ``PATH``; ``None`` if there is none."""
    cxx = shlex.split(os.environ.get("CXX", ""))
    if cxx and shutil.which(cxx[0]):
        return cxx
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return [name]
    return None


def command(
    compiler: list[str],
    target: str,
    output: str | os.PathLike[str],
    *,
    source: Path = SOURCE,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The command line that builds ``source`` into the shared library ``output`` for ``target`` (an
    x86-64 level, ``GENERIC`` or ``NATIVE``), recording the source's hash and the target in it."""
    march = [] if target == GENERIC else [f"-march={target}"]
    ident = source_id(source.read_bytes())
    defines = [f'-DFLEXBN_SOURCE_ID="{ident}"', f'-DFLEXBN_TARGET="{target}"']
    return [*compiler, *FLAGS, *march, *defines, *extra, str(source), "-o", os.fspath(output)]
