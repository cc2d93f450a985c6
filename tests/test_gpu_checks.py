"""bench/gpu_checks.py is not broken before a GPU shows up: it refuses cleanly without CUDA, and
its table code path runs end to end on the tiny model on the CPU."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "bench" / "gpu_checks.py"


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so "no CUDA" holds on every machine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_without_cuda_it_says_so_and_exits_2(tmp_path):
    result = run_script("--out", str(tmp_path / "out.json"), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "needs a CUDA GPU and this machine has none" in result.stderr
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
