"""The package as users install it: the wheel ``pip wheel .`` builds, installed into a fresh virtual
environment and imported from outside the checkout.

The rest of the suite runs on an editable install, which sees the source tree and cannot notice a file
missing from the wheel (the kernels were: every installed flexbn ran the slow reference path, silently).
Here the wheel must carry the kernels built for each x86-64 level and their source, and batch norm must
run them with no compiler and an empty cache; a wheel built without a compiler must still install, and
then run the reference with one warning that says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch

from flexbn._core import _build

pytestmark = [pytest.mark.one_backend, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]

# Run inside the installed wheel: where flexbn and its kernels come from, and whether a training step
# (forward and backward) runs on them and equals the reference.
CHECK = r"""
import json, warnings, torch, flexbn
from flexbn._core import kernels
calls = []
for name in ("forward", "backward"):
    fn = getattr(kernels, name)
    setattr(kernels, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
x = torch.randn(8, 3, 5, 5, dtype=torch.float64, requires_grad=True)
opt = {"detach_var": True}  # a flexbn option: auto runs the kernels (small batches without one: torch's)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = flexbn.batch_norm(x, None, None, training=True, **opt)
    (gx,) = torch.autograd.grad(y.sum() + (y**2).sum(), x)
with flexbn.use_backend("reference"):
    z = flexbn.batch_norm(x, None, None, training=True, **opt)
    (gz,) = torch.autograd.grad(z.sum() + (z**2).sum(), x)
print(json.dumps({
    "file": flexbn.__file__,
    "info": flexbn.backend_info(),
    "calls": sorted(set(calls)),
    "close": bool(torch.allclose(y, z, atol=1e-12) and torch.allclose(gx, gz, atol=1e-10)),
    "warnings": [str(w.message) for w in caught],
}))
"""


def _copy_source(dest: Path) -> Path:
    """The files a source distribution holds, without build products (a clean checkout)."""
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    shutil.copytree(ROOT / "src", dest / "src", ignore=ignore)
    return dest


def _wheel(tmp: Path, env: dict[str, str]) -> Path:
    source = _copy_source(tmp / "source")
    dist = tmp / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(dist)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = dist.glob("flexbn-*.whl")
    return wheel


def _install(wheel: Path, tmp: Path) -> Path:
    """A fresh virtual environment with the wheel installed and this environment's torch visible."""
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # torch's directory as a plain path entry: its .pth files (this checkout's editable flexbn) are not
    # processed, so flexbn can only come from the wheel.
    Path(site, "torch-here.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return env_dir


def _check(env_dir: Path, tmp: Path, **env: str) -> dict:
    """CHECK run by the installed flexbn, from a directory outside the checkout, with an empty cache."""
    cache = tmp / "cache"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXBN_", "PYTHON"))}
    run_env |= {"FLEXBN_CACHE_DIR": str(cache), **env}
    done = subprocess.run(
        [env_dir / "bin" / "python", "-c", CHECK], cwd=tmp, env=run_env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    result["cache"] = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert result["file"].startswith(str(env_dir)), result["file"]
    assert result["close"]
    return result


@pytest.mark.skipif(
    _build.find_compiler() is None, reason="no C++ compiler to build the wheel's kernels"
)
def test_wheel_ships_the_kernels(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path, dict(os.environ))
    assert wheel.name == f"flexbn-0.1.0-py3-none-{wheel.name.rsplit('-', 1)[1][:-4]}.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    for target in _build.install_targets():
        assert f"flexbn/_core/{_build.shipped_name(target)}" in names
    assert {"flexbn/_core/kernels.cpp", "flexbn/_core/native.py", "flexbn/py.typed"} <= names
    env_dir = _install(wheel, tmp_path)
    result = _check(env_dir, tmp_path, CXX="", PATH=str(tmp_path))  # no compiler at run time
    info = result["info"]
    assert info["kernels"] == "shipped", info
    assert info["cpu"] == "cpp"
    assert info["path"].startswith(str(env_dir))
    assert info["target"] in _build.install_targets()
    assert result["calls"] == ["backward", "forward"]
    assert not result["warnings"]
    assert result["cache"] == []  # nothing was built at run time


def test_wheel_without_a_compiler(tmp_path: Path) -> None:
    """No compiler at install: the wheel still builds and installs, without kernels; flexbn then runs the
    reference, warns once with the reason, and backend_info() says so."""
    wheel = _wheel(tmp_path, {**os.environ, "CXX": "false"})
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith(".so")]
    env_dir = _install(wheel, tmp_path)
    result = _check(env_dir, tmp_path, CXX="", PATH=str(tmp_path))
    info = result["info"]
    assert (info["kernels"], info["cpu"]) == ("unavailable", "reference")
    assert "none were built at install time" in info["reason"]
    assert "no C++ compiler found" in info["reason"]
    assert result["calls"] == []
    assert len(result["warnings"]) == 1
    assert "none were built at install time" in result["warnings"][0]
