"""bench/gpu_checks.py and bench/gpu.py are not broken before a GPU shows up: both refuse cleanly
without CUDA, and gpu_checks' table code path runs end to end on the tiny model on the CPU
(gpu.py's smoke run is in test_gpu_bench.py)."""

import json

import pytest

from tests.helpers import run_bench_script

def run_script(*args: str, timeout: float):
    return run_bench_script("gpu_checks.py", *args, timeout=timeout)


@pytest.mark.parametrize("script", ["gpu_checks.py", "gpu.py"])
def test_without_cuda_it_says_so_and_exits_2(script, tmp_path):
    result = run_bench_script(script, "--out", str(tmp_path / "out.json"), timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"bench/{script} needs a CUDA GPU and this machine has none" in result.stderr
    assert "--device cpu --tiny" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.json").exists()  # nothing measured, nothing written


@pytest.mark.slow
def test_the_cpu_smoke_run_prints_the_table_and_passes(tmp_path):
    out = tmp_path / "gpu_checks.json"
    result = run_script("--device", "cpu", "--tiny", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("metrics all-reduce on gloo", "DDP all-reduces per optimizer step", "trajectories sent as CPU tensors",
                 "grad cosine vs fp32", "|ratio-1| fp32, TF32 off", "|ratio-1| bf16", "peak memory"):
        assert line in result.stdout, line
    assert "0 failed" in result.stdout
    figures = json.loads(out.read_text())
    assert figures["all_reduce"]["calls"] == figures["all_reduce"]["optimizer_steps"] * figures["all_reduce"]["buckets"]
    assert figures["transport"]["devices"] == ["cpu"]
    assert {r["verdict"] for r in figures["rows"]} <= {"PASS", "info"}
