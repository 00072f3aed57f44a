"""benchmarks/gpu_check.py, the one call that checks and measures flexbn on a GPU: what can be checked
without one -- its arguments, the steps it would run, the skip without a CUDA device, the model it times."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

import flexbn
from flexbn import bench

pytestmark = pytest.mark.one_backend

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(gpu_check: ModuleType) -> None:
    args = gpu_check.parse_args([])
    assert args.steps == list(gpu_check.STEPS)
    assert args.backends == ["auto", "triton"]
    assert args.budget_s < 8 * 60
    args = gpu_check.parse_args(["--steps", "bench,tests", "--backends", "triton"])
    assert args.steps == ["tests", "bench"]  # always in the script's order
    assert [s.name for s in gpu_check.plan(args)] == ["tests", "bench"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "tests,benchmarks"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget-s", "0"])


def test_dry_run_lists_the_steps(gpu_check: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--dry-run"]) == 0
    text = capsys.readouterr().out
    for name in gpu_check.STEPS:
        assert name in text
    assert "tests/test_triton.py -k cuda" in text
    assert "32x64x56x56 float32" in text


def test_tests_step_selects_the_cuda_cases(gpu_check: ModuleType, tmp_path: Path) -> None:
    """The tests step's ``-k cuda`` picks the CUDA parametrization of the Triton tests (its id is
    ``cuda``) and the CUDA standard-path test."""
    command = gpu_check.tests_command(tmp_path)
    assert command[command.index("-k") + 1] == "cuda"
    source = (ROOT / "tests" / "test_triton.py").read_text(encoding="utf-8")
    assert 'pytest.param("cuda", id="cuda"' in source
    assert "def test_cuda_standard_path_is_torch" in source


def test_bench_plan_covers_the_targets(gpu_check: ModuleType) -> None:
    """The targets' shapes in float32 and bfloat16 come first; every block is a shape the bench takes."""
    first = gpu_check.BENCH_PLAN[:4]
    assert {s for s, _ in first} == {"32x64x56x56", "64x256x14x14"}
    assert {d for _, d in first} == {"float32", "bfloat16"}
    assert (
        gpu_check.BENCH_PLAN[-1][0] == gpu_check._targets().GPU_PER_CALL_SHAPE
    )  # its per-call rows
    for shape, dtype in gpu_check.BENCH_PLAN:
        bench.Shape.parse(shape)
        assert isinstance(getattr(torch, dtype), torch.dtype)


@pytest.mark.parametrize("require", [False, True], ids=["default", "require_gpu"])
def test_skips_without_gpu(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, require: bool
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "results"
    argv = ["--out", str(out)] + (["--require-gpu"] if require else [])
    assert gpu_check.main(argv) == (1 if require else 0)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert "no CUDA device" in summary["skipped"]


def test_model_is_resnet_like(gpu_check: ModuleType) -> None:
    """The model step's network trains with torch's and flexbn's batch norms (here on the CPU)."""
    net = gpu_check.resnet_like(channels=4)
    converted = flexbn.convert(gpu_check.resnet_like(channels=4), detach_var=True)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 11
    assert sum(isinstance(m, flexbn.BatchNorm2d) for m in converted.modules()) == 11
    x = torch.randn(4, 3, 16, 16)
    for model in (net, converted):
        model(x).sum().backward()


def test_bench_step_writes_rows_and_targets(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench step's own code (the bench's rows written after every block, the project's targets
    judged on them) runs here on rows the CPU measures in place of CUDA's."""
    small = gpu_check._targets().GPU_PER_CALL_SHAPE  # judged there: the per-call target
    rows = bench.run(["16x4"], variants=["detach_var"], passes=["fwd+bwd"], quick=True)
    rows = [dataclasses.replace(r, shape=small) for r in rows]
    calls: list[dict[str, object]] = []

    def fake_run(shapes: list[str], **kwargs: object) -> list[bench.Row]:
        calls.append({"shapes": shapes, **kwargs})
        return rows

    monkeypatch.setattr(bench, "run", fake_run)
    args = gpu_check.parse_args(["--steps", "bench"])
    result = gpu_check.bench(args, tmp_path, seconds=60.0)
    assert result["ok"]
    assert [c["shapes"] for c in calls] == [[s] for s, _ in gpu_check.BENCH_PLAN]
    assert all(c["device"] == "cuda" for c in calls)
    assert len(bench.read_json(tmp_path / "rows.json")) == len(rows) * len(gpu_check.BENCH_PLAN)
    text = (tmp_path / "bench.md").read_text(encoding="utf-8")
    assert "detach_var" in text
    judged = [line for line in text.splitlines() if line.startswith(("met ", "NOT MET "))]
    assert result["targets"] == len(judged) > 0
