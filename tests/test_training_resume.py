"""Checkpoints: a run killed with SIGKILL and resumed with ``--resume latest`` ends bit-identical
to an uninterrupted run; checkpoint folders are atomic and limited in number."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from riemann_diffusion.training.checkpoint import list_checkpoints, resolve_resume

ARGS = ["--max-steps", "12", "--checkpoint-every", "3", "--checkpoint-limit", "2", "--validate-every", "-1",
        "--progress-bar", "false", "--random-flip", "true", "--noise-offset", "0.05"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# The killed run: same training, but each step waits a little so the kill lands mid-run.
SLOW_DRIVER = """
import sys, time
from riemann_diffusion.training.cli import add_arguments, config_from_args
from riemann_diffusion.training import train
import argparse
p = argparse.ArgumentParser(); add_arguments(p)
train(config_from_args(p.parse_args(sys.argv[1:])), callback=lambda *a: time.sleep(0.4))
"""


def _cli(out: Path, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "riemann_diffusion", "train", "--output-dir", str(out), *ARGS, *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def _tensors_equal(a: Path, b: Path):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.mark.slow
def test_sigkill_then_resume_latest_is_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    done = _cli(ref)
    assert done.returncode == 0, done.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DRIVER, "--output-dir", str(out), *ARGS], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(step >= 3 for step, _ in list_checkpoints(out)):
            time.sleep(0.5)  # land somewhere after the checkpoint, mid-step
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "adapter.safetensors").exists()
    killed_at = list_checkpoints(out)[-1][0]
    assert 3 <= killed_at < 12

    resumed = _cli(out, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(step {killed_at})" in resumed.stderr  # the log line of load_checkpoint
    _tensors_equal(ref / "adapter_state.safetensors", out / "adapter_state.safetensors")
    _tensors_equal(ref / "adapter.safetensors", out / "adapter.safetensors")
    # the log continues where the checkpoint was: same steps and the same losses
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (ref / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows[killed_at:]] == [r["loss"] for r in ref_rows[killed_at:]]
    # checkpoint limit: only the newest two survive
    assert [s for s, _ in list_checkpoints(ref)] == [9, 12]


def test_incomplete_checkpoint_folders_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-00000004").mkdir(parents=True)
    (root / "step-00000004" / "trainer_state.json").write_text("{}")
    (root / "step-00000008").mkdir()  # no trainer_state.json: a crash mid-write
    (root / ".tmp-step-00000009-123").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert resolve_resume(tmp_path, "latest").name == "step-00000004"
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path / "empty", "latest") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(root / "step-00000008"))


def test_save_checkpoint_roundtrip_restores_optimizer_state(tmp_path):
    from riemann_diffusion.injection import adapter_parameters, inject_adapters
    from riemann_diffusion.optimizer import Riemannion
    from riemann_diffusion.training.checkpoint import load_checkpoint, save_checkpoint

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
        inject_adapters(model, ["0", "2"], rank=2)
        opt = Riemannion(adapter_parameters(model), lr=0.1, momentum=0.9)
        keys = [f"m.{n}.{f}" for n in ("0", "2") for f in ("lora_A", "lora_B")]
        return model, opt, keys

    def step(model, opt, seed):
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()

    a, opt_a, keys = setup()
    step(a, opt_a, 0)
    path = save_checkpoint(tmp_path, 1, {"m": a}, opt_a, keys, {"note": 1})
    assert path.name == "step-00000001" and not list(path.parent.glob(".tmp*"))
    step(a, opt_a, 1)
    b, opt_b, _ = setup()
    state = load_checkpoint(path, {"m": b}, opt_b, keys)
    assert state["step"] == 1 and state["note"] == 1
    step(b, opt_b, 1)
    for pa, pb in zip(adapter_parameters(a), adapter_parameters(b)):
        assert torch.equal(pa, pb)  # momentum came back with the checkpoint
