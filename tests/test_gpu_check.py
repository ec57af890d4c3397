"""The prepared GPU check's harness (benchmarks/device/gpu_check.py), on the CPU: one JSON line per
result with its "ok", a summary line, the exit code, and a check that runs over its budget killed
and reported as an error line while the run goes on. The checks themselves run with
`bash benchmarks/device/gpu_check.sh --cpu` (minutes: docs/performance.md), not here."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device" / "gpu_check.py"


def run(*flags: str) -> tuple[int, list[dict]]:
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=120, cwd=ROOT)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def test_env_on_the_cpu_prints_its_line_and_the_summary():
    code, lines = run("--cpu", "--only", "env")
    assert code == 0
    env, summary = lines
    assert env["check"] == "env" and env["ok"] and env["device"] == "cpu" and env["missing"] == []
    assert env["hf_hub_offline"]  # nothing may reach the Hub
    assert summary["check"] == "summary" and summary["ok"] and summary["failed"] == []
    assert list(summary["checks_s"]) == ["env"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_gpu_run_fails_in_one_line_per_check():
    code, lines = run("--only", "env")
    assert code == 1
    assert lines[0]["check"] == "env" and not lines[0]["ok"]
    assert "no CUDA device" in lines[0]["error"] and "--cpu" in lines[0]["error"]
    assert lines[-1]["failed"] == ["env"]


def test_a_check_over_its_budget_is_killed_and_reported():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    args = argparse.Namespace(cpu=True, memory_batch=2, steps=None, sampling_compile=None)
    # Half a second: the child is still importing torch.
    assert gpu_check.run_isolated("env", 0.5, args) == [
        {"check": "env", "error": "over its budget of 0.5 s: killed", "ok": False}
    ]
