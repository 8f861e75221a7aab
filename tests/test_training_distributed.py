"""Two CPU processes (gloo, ``accelerate launch --multi_gpu``) train the same adapter on both ranks,
equal to a one-process run with the same global batch; gradient accumulation likewise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from riemann_diffusion.training import TrainConfig, apply_overrides, train

SCRIPT = """
import os, sys
from safetensors.torch import save_file
from riemann_diffusion.training import TrainConfig, apply_overrides, train
out, bs = sys.argv[1], sys.argv[2]
cfg = apply_overrides(TrainConfig(), {"output_dir": out, "batch_size": bs, "max_steps": 3, "validate_every": -1,
                                      "progress_bar": False, "checkpoint_every": 2, "random_flip": True})
result = train(cfg)
save_file(result.state, os.path.join(out, f"rank{os.environ.get('RANK', '0')}.safetensors"))
"""
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _assert_close(a: dict, b: dict, exact=False):
    """Same tensors (exact) or the same updates X − X0 per layer to float tolerance.

    The factors themselves are compared only through X: A_L is unique only up to a
    rotation when two singular values of X nearly coincide.
    """
    assert a.keys() == b.keys()
    if exact:
        for k in a:
            assert torch.equal(a[k], b[k]), k
        return
    for k in (k[: -len(".lora_A")] for k in a if k.endswith(".lora_A")):
        da, db = (s[f"{k}.lora_A"] @ s[f"{k}.lora_B"].T - s[f"{k}.lora_A0"] @ s[f"{k}.lora_B0"].T for s in (a, b))
        assert float((da - db).norm()) <= 1e-3 * float(da.norm()) + 1e-9, k


@pytest.mark.slow
def test_two_processes_match_each_other_and_one_process(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(script), str(two), "1"]
    proc = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, str(script), str(one), "2"], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    r0, r1 = load_file(two / "rank0.safetensors"), load_file(two / "rank1.safetensors")
    _assert_close(r0, r1, exact=True)  # every rank took the same step
    single = load_file(one / "rank0.safetensors")
    _assert_close(r0, single)
    moved = [k for k in single if k.endswith("lora_B") and not torch.equal(single[k], single[k + "0"])]
    assert moved
    # only the main process wrote the outputs, once
    assert (two / "adapter.safetensors").is_file() and sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000003"]


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    common = {"max_steps": 2, "validate_every": -1, "progress_bar": False, "checkpoint_every": 0}
    big = train(apply_overrides(TrainConfig(), {**common, "output_dir": str(tmp_path / "a"), "batch_size": 2}))
    acc = train(apply_overrides(TrainConfig(), {**common, "output_dir": str(tmp_path / "b"), "batch_size": 1,
                                                "gradient_accumulation": 2}))
    _assert_close(big.state, acc.state)
