"""Smoke test of benchmarks/: each script runs with --quick and prints sane tables.

No timing assertions (the machine is shared): only that every script exits 0,
prints its command line and its markdown tables, and that the ratios it reports
are finite positive numbers. The three scripts start together (one thread each)
so the file takes about as long as the slowest of them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("bench_regression.py", "bench_optimizer_step.py", "bench_train_step.py")
TIMEOUT_S = 600

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs():
    """Start every benchmark with --quick at once; tests collect (returncode, stdout, stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    procs = {
        name: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / name), "--quick", "--threads", "1"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in SCRIPTS
    }
    results = {}

    def result(name):
        if name not in results:
            try:
                out, err = procs[name].communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                procs[name].kill()
                out, err = procs[name].communicate()
                err += f"\n[timed out after {TIMEOUT_S} s]"
            results[name] = (procs[name].returncode, out, err)
        return results[name]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def tables(stdout: str) -> list[list[dict[str, str]]]:
    """Every markdown table in stdout as a list of {header: cell} rows."""
    found, block = [], []
    for line in stdout.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            header, rows = block[0], block[2:]
            assert set(block[1]) == {"---"}, f"malformed table separator: {block[1]}"
            assert all(len(r) == len(header) for r in rows), f"ragged table under {header}"
            found.append([dict(zip(header, r)) for r in rows])
            block = []
    return found


def finite_positive(cell: str) -> bool:
    try:
        x = float(cell)
    except ValueError:
        return False
    return math.isfinite(x) and x > 0


def run_ok(runs, name) -> tuple[str, list]:
    code, out, err = runs(name)
    assert code == 0, f"{name} exited {code}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    command = next((line for line in out.splitlines() if line.startswith("Command: `")), "")
    assert f"benchmarks/{name} --quick --threads 1`" in command, f"no command line in the output:\n{out[:500]}"
    found = tables(out)
    assert found, f"{name} printed no table:\n{out}"
    return out, found


def test_regression_reports_steps_and_finite_ratio(runs):
    out, found = run_ok(runs, "bench_regression.py")
    headline = found[0]  # steps to 1%
    by_method = {row["method"]: row for row in headline}
    assert {"Riemannion heavy_ball", "Riemannion muon", "Adam (PEFT LoRA)", "SGD+momentum (PEFT LoRA)"} <= set(by_method)
    assert by_method["Adam (PEFT LoRA)"]["× Adam"] == "1.00"
    # heavy-ball and Adam both reach 1% within the quick budget: the ratio is a finite number
    assert finite_positive(by_method["Riemannion heavy_ball"]["× Adam"]), by_method["Riemannion heavy_ball"]
    assert int(by_method["Riemannion heavy_ball"]["median steps"]) > 0


def test_optimizer_step_reports_ratios_and_breakdown(runs):
    out, found = run_ok(runs, "bench_optimizer_step.py")
    timing = found[0]
    labels = {row["optimizer"] for row in timing}
    assert "AdamW (foreach)" in labels and len(labels) == 5, labels
    for row in timing:
        assert finite_positive(row["median ms"]) and finite_positive(row["× AdamW"]), row
    assert "Where a Riemannion step goes" in out
    breakdown = [t for t in found[1:] if t and "ms/step" in t[0]]
    assert breakdown, "no profiler breakdown table"
    assert any("QR" in row.get("op category (outermost aten op, children included)", "") for t in breakdown for row in t)


def test_train_step_reports_time_and_memory_ratios(runs):
    out, found = run_ok(runs, "bench_train_step.py")
    timing, memory = found
    assert {row["method"] for row in timing} == {"PEFT LoRA + AdamW", "Riemannion heavy_ball", "Riemannion muon"}
    for row in timing:
        assert finite_positive(row["× PEFT LoRA + AdamW"]), row
    for row in memory:
        assert finite_positive(row["× peak"]) and finite_positive(row["× training peak"]), row
    # both adapters train the same number of values at the same rank
    assert len({row["trainable"] for row in timing}) == 1
