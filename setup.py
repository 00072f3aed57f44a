"""Builds flexbn's CPU kernels into the package at install time (``pip install .``, ``pip wheel .``).

``src/flexbn/_core/kernels.cpp`` becomes plain shared libraries (no Python or torch headers: ctypes loads
them), one per x86-64 level -- ``_kernels-x86-64-v4.so``, ``-v3``, ``-v2`` and the baseline ``x86-64`` --
of which flexbn loads the best one the processor supports; on other architectures one library for the
compiler's default target. No compiler is needed at run time. Each library is optional: without a
compiler the install still succeeds, and flexbn builds the kernels at first use if a compiler appears
later, or runs its pure-torch reference path with a warning (``flexbn.backend_info()`` says which).
Everything else about the package is in ``pyproject.toml``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, ExecError

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

_spec = importlib.util.spec_from_file_location(
    "_flexbn_build", Path(__file__).parent / "src" / "flexbn" / "_core" / "_build.py"
)
build = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(build)  # type: ignore[union-attr]

PREFIX = "flexbn._core._kernels-"


class BuildKernels(build_ext):
    """Compiles each kernel library with the flags the run-time build uses (``_build.FLAGS``), not
    Python's (``-g``, ``-fwrapv``), and names it without a Python ABI tag (it does not use Python)."""

    def get_ext_filename(self, fullname: str) -> str:
        if fullname.rpartition(".")[2].startswith("_kernels-"):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if not ext.name.startswith(PREFIX):
            super().build_extension(ext)
            return
        target = ext.name[len(PREFIX) :]
        compiler = build.find_compiler()
        if compiler is None:
            raise CompileError("no C++ compiler found (set $CXX, or install g++ or clang++)")
        output = Path(self.get_ext_fullpath(ext.name))
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.spawn(build.command(compiler, target, output))
        except ExecError as err:  # a compiler too old for the level, no OpenMP, ...
            raise CompileError(f"building flexbn's kernels for {target} failed: {err}") from err


class Wheel(bdist_wheel):
    """The kernels use neither Python's API nor its ABI: one wheel per platform, any Python 3."""

    def get_tag(self) -> tuple[str, str, str]:
        _, _, plat = super().get_tag()
        return "py3", "none", plat


KERNELS = [
    Extension(PREFIX + target, sources=["src/flexbn/_core/kernels.cpp"], optional=True)
    for target in build.install_targets()
]

setup(
    ext_modules=[] if sys.platform == "win32" else KERNELS,
    cmdclass={"build_ext": BuildKernels, "bdist_wheel": Wheel},
    options={"build_ext": {"parallel": True}},
)
