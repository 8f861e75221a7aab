"""Benchmark (c): one training step of a small UNet, Riemannion vs PEFT LoRA + AdamW.

A training step is forward + denoising MSE loss + backward + optimizer step +
zero_grad, batch 4, random latents / noise / timesteps and random
``encoder_hidden_states`` (77 tokens), adapters on ``to_q, to_k, to_v, to_out.0``:

* ``PEFT LoRA + AdamW``: ``peft.inject_adapter_in_model`` (r, lora_alpha = r) and
  ``torch.optim.AdamW(foreach=True)``;
* ``Riemannion heavy_ball`` / ``Riemannion muon``: ``inject_adapters`` (same r) and
  ``Riemannion(adapter_parameters(unet), rule=...)`` (batched path).

Time: the configurations run round-robin (A, B, C, A, B, C, ...) after a warmup,
median step reported. Memory: each configuration runs again in a fresh child
process; on CPU its peak RSS (Linux VmHWM, reset just before the first step,
glibc's mmap threshold pinned so freed blocks return to the OS) minus the RSS at
that reset is the training peak; on CUDA, ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_train_step.py            # full (~3-5 min on 2 cores)
    python benchmarks/bench_train_step.py --quick    # smoke (~20 s)
    python benchmarks/bench_train_step.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import common
from riemann_diffusion import Riemannion, adapter_parameters, inject_adapters
from riemann_diffusion.tiny import make_tiny_unet, tiny_unet_config

BATCH = 4
TOKENS = 77
BASELINE = "PEFT LoRA + AdamW"
METHODS = (BASELINE, "Riemannion heavy_ball", "Riemannion muon")
FULL_CONFIGS = [("sd15", 8, 4), ("sd15", 8, 16), ("sd15", 16, 4), ("sd15", 16, 16), ("small", 8, 4), ("small", 8, 16)]
QUICK_CONFIGS = [("sd15", 8, 4)]
MEMORY_STEPS = 3


class Trainer:
    """A UNet with adapters, its optimizer and a few fixed batches; ``step()`` trains once."""

    def __init__(self, method: str, kind: str, latent: int, rank: int, device, dtype, n_batches: int = 4):
        from diffusers import DDPMScheduler

        self.device = device
        unet = make_tiny_unet(kind, seed=0, dtype=dtype).to(device).train()
        if method == BASELINE:
            common.peft_lora(unet, common.ATTN_TARGETS, rank)
            self.opt = torch.optim.AdamW(common.trainable(unet), lr=1e-4, foreach=True)
        else:
            inject_adapters(unet, common.ATTN_TARGETS, rank=rank, seed=0)
            unet.to(device)
            rule = method.split()[-1]
            self.opt = Riemannion(adapter_parameters(unet), lr=1e-5, momentum=0.9, rule=rule, batched=True)
        self.unet = unet
        self.trainable = common.count(common.trainable(unet))
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        cross = tiny_unet_config(kind)["cross_attention_dim"]
        g = torch.Generator().manual_seed(1)
        self.batches = []
        for _ in range(n_batches):
            latents = torch.randn(BATCH, 4, latent, latent, generator=g)
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, 1000, (BATCH,), generator=g)
            noisy = self.scheduler.add_noise(latents, noise, t)
            ehs = torch.randn(BATCH, TOKENS, cross, generator=g)
            self.batches.append(tuple(x.to(device, dtype) if x.is_floating_point() else x.to(device)
                                      for x in (noisy, t, ehs, noise)))
        self.i = 0

    def step(self) -> float:
        noisy, t, ehs, noise = self.batches[self.i % len(self.batches)]
        self.i += 1
        pred = self.unet(noisy, t, encoder_hidden_states=ehs).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


# ----------------------------------------------------------------------------- memory
def measure_memory_here(method: str, kind: str, latent: int, rank: int, device, dtype) -> dict:
    """Peak memory of MEMORY_STEPS training steps in this (fresh) process."""
    trainer = Trainer(method, kind, latent, rank, device, dtype)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        losses = [trainer.step() for _ in range(MEMORY_STEPS)]
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"base_mib": base / 2**20, "peak_mib": peak / 2**20, "losses": losses, "source": "cuda allocator"}
    if not common.reset_peak_rss():
        return {"error": "cannot reset the peak RSS (/proc/self/clear_refs); memory not measured"}
    base = common.rss_status_kib()["VmRSS"]
    losses = [trainer.step() for _ in range(MEMORY_STEPS)]
    peak = common.rss_status_kib()["VmHWM"]
    return {"base_mib": base / 1024, "peak_mib": peak / 1024, "losses": losses, "source": "peak RSS"}


def measure_memory_child(method: str, kind: str, latent: int, rank: int, args) -> dict:
    """Run :func:`measure_memory_here` in a fresh interpreter; returns its JSON."""
    spec = json.dumps({"method": method, "kind": kind, "latent": latent, "rank": rank})
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", spec, "--device", args.device,
           "--dtype", args.dtype]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        return {"error": f"child failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def time_config(kind, latent, rank, device, dtype, warmup, reps) -> tuple[dict, dict]:
    """Median-able step times (ms lists) and trainable counts of every method, interleaved."""
    trainers = {m: Trainer(m, kind, latent, rank, device, dtype) for m in METHODS}
    counts = {m: t.trainable for m, t in trainers.items()}
    times = common.interleaved_times({m: t.step for m, t in trainers.items()}, device, warmup, reps)
    del trainers
    gc.collect()
    return times, counts


def measure_all_memory(configs, args, workers: int = 2) -> dict:
    """(config, method) -> memory dict, each from its own child process (run ``workers`` at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    keys = [(c, m) for c in configs for m in METHODS]
    with ThreadPoolExecutor(workers) as ex:
        results = ex.map(lambda key: measure_memory_child(key[1], *key[0], args), keys)
        return dict(zip(keys, results))


def table_rows(config, times, counts, memory) -> tuple[list, list]:
    kind, latent, rank = config
    base_t = common.median(times[BASELINE])
    base_m = memory[(config, BASELINE)]
    time_rows, mem_rows = [], []
    for m in METHODS:
        med = common.median(times[m])
        q = sorted(times[m])
        time_rows.append([kind, f"{latent}×{latent}", rank, m, f"{counts[m]:,}", common.fmt(med, 1),
                          f"{common.fmt(q[len(q) // 4], 1)}–{common.fmt(q[(3 * len(q)) // 4], 1)}",
                          common.fmt(common.ratio(med, base_t))])
        mem = memory[(config, m)]
        if "error" in mem or "error" in base_m:
            mem_rows.append([kind, f"{latent}×{latent}", rank, m, mem.get("error", base_m.get("error")), "", "", "", ""])
            continue
        delta, base_delta = mem["peak_mib"] - mem["base_mib"], base_m["peak_mib"] - base_m["base_mib"]
        mem_rows.append([kind, f"{latent}×{latent}", rank, m, common.fmt(mem["peak_mib"], 1), common.fmt(delta, 1),
                         common.fmt(common.ratio(mem["peak_mib"], base_m["peak_mib"]), 3),
                         common.fmt(common.ratio(delta, base_delta), 2), mem["source"]])
    return time_rows, mem_rows


def main(argv=None) -> int:
    parser = common.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3; quick 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 15; quick 3)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = common.setup(args)
    dtype = common.DTYPES[args.dtype]
    if args.memory_child:
        spec = json.loads(args.memory_child)
        print(json.dumps(measure_memory_here(spec["method"], spec["kind"], spec["latent"], spec["rank"], device, dtype)))
        return 0
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    reps = args.reps if args.reps is not None else (3 if args.quick else 15)
    configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS
    common.print_header(
        "Training step: Riemannion vs PEFT LoRA + AdamW (UNet, to_q/k/v/out.0)", device,
        f"batch {BATCH}, {TOKENS} text tokens, model dtype {args.dtype}, adapters fp32; ε-prediction MSE; "
        f"warmup {warmup}, median of {reps} round-robin steps; memory from a fresh process per row "
        f"({MEMORY_STEPS} steps, two processes at a time, after all timing)",
    )
    timed = {c: time_config(*c, device, dtype, warmup, reps) for c in configs}
    memory = measure_all_memory(configs, args)
    time_rows, mem_rows = [], []
    for config, (times, counts) in timed.items():
        t, m = table_rows(config, times, counts, memory)
        time_rows += t
        mem_rows += m
    print("### Step time\n")
    print(common.markdown_table(["UNet", "latent", "rank", "method", "trainable", "median ms", "p25–p75 ms",
                                 f"× {BASELINE}"], time_rows))
    print("\n### Peak memory\n")
    print(common.markdown_table(["UNet", "latent", "rank", "method", "peak MiB", "training peak MiB",
                                 "× peak", "× training peak", "source"], mem_rows))
    print(f"\nGoals: time ≤ 1.15×, memory ≤ 1.05× of {BASELINE}. 'peak' includes the interpreter, torch and the "
          "model; 'training peak' is the peak above the memory held just before the first step "
          "(activations, gradients, optimizer state, temporaries).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
