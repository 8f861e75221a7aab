"""Training benchmarks of the DreamBooth trainer (issue #4, item 7). Self-contained.

Three parts, each printing a Markdown table (and writing JSON with --json):

``speed``    step time and peak memory of one training step, Riemannion vs PEFT LoRA +
             AdamW: same UNet, same targets (the sd15 preset), same rank and batch.
             Step times are interleaved (A, B, A, B ...) in one process so machine load
             hits both alike; peak memory is measured in a fresh subprocess per method
             (peak RSS of the training steps above the RSS before them, via
             /proc/self/clear_refs, Linux only).
``recovery`` a teacher = the tiny UNet plus a hidden rank-4 change of every attention
             weight; students (Riemannion heavy-ball, Riemannion-Muon, AdamW LoRA, each
             at its best lr from a small grid) learn it from the denoising loss on the
             teacher's predictions. Reports steps until the held-out loss falls under a
             threshold and the loss after a fixed budget.
``sweep``    the default-lr experiment: the default DreamBooth run (tiny pipeline,
             example images) for each lr, scored by the denoising loss on fixed
             held-out draws of the same images.

    python benchmarks/bench_training.py speed recovery [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ----------------------------------------------------------------------------- models
def _unet(kind: str):
    from riemann_diffusion.tiny import make_tiny_unet

    return make_tiny_unet(kind).train()


def _attach(unet, method: str, rank: int, lr: float):
    """Adapters + optimizer: "riemannion" / "muon" (ours) or "adamw" (PEFT LoRA)."""
    if method in ("riemannion", "muon"):
        from riemann_diffusion import Riemannion, adapter_parameters, inject_adapters

        inject_adapters(unet, TARGETS, rank=rank)
        rule = "muon" if method == "muon" else "heavy_ball"
        return Riemannion(adapter_parameters(unet), lr=lr, momentum=0.9, rule=rule)
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=True), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _inputs(unet, batch: int, latent: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, 8, unet.config.cross_attention_dim, generator=g)
    return x, t, ctx


def _step(unet, opt, batch, latent, seed):
    x, t, ctx = _inputs(unet, batch, latent, seed)
    loss = (unet(x, t, encoder_hidden_states=ctx).sample - x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ----------------------------------------------------------------------------- speed
def speed(kind: str, rank: int, batch: int, latent: int, steps: int, warmup: int = 3) -> dict:
    """Median step seconds of both methods, interleaved in blocks of 5 steps."""
    setups = {m: (u, _attach(u, m, rank, 1e-4)) for m, u in (("riemannion", _unet(kind)), ("adamw", _unet(kind)))}
    for m, (u, o) in setups.items():
        for i in range(warmup):
            _step(u, o, batch, latent, i)
    times = {m: [] for m in setups}
    for block in range(max(1, steps // 5)):
        for m, (u, o) in setups.items():
            for i in range(5):
                t0 = time.perf_counter()
                _step(u, o, batch, latent, 100 + block * 5 + i)
                times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"model": kind, "rank": rank, "batch": batch, "latent": latent, "steps": len(times["adamw"]),
            "riemannion_s": med["riemannion"], "adamw_s": med["adamw"], "time_ratio": med["riemannion"] / med["adamw"]}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(kind: str, method: str, rank: int, batch: int, latent: int, steps: int) -> dict:
    unet = _unet(kind)
    opt = _attach(unet, method, rank, 1e-4)
    _step(unet, opt, batch, latent, 0)  # optimizer state exists from here on
    base = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    for i in range(steps):
        _step(unet, opt, batch, latent, i + 1)
    peak = _rss_kb("VmHWM")
    return {"method": method, "base_mib": base / 1024, "peak_mib": peak / 1024, "train_mib": (peak - base) / 1024}


def memory(kind: str, rank: int, batch: int, latent: int, steps: int = 4) -> dict:
    out = {}
    for method in ("riemannion", "adamw"):
        cmd = [sys.executable, __file__, "_memory", kind, method, str(rank), str(batch), str(latent), str(steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        out[method] = json.loads(res.stdout.strip().splitlines()[-1])
    r, a = out["riemannion"], out["adamw"]
    return {"model": kind, "peak_mib_riemannion": r["peak_mib"], "peak_mib_adamw": a["peak_mib"],
            "peak_ratio": r["peak_mib"] / a["peak_mib"], "train_mib_riemannion": r["train_mib"],
            "train_mib_adamw": a["train_mib"], "train_ratio": r["train_mib"] / max(a["train_mib"], 1e-9)}


# ----------------------------------------------------------------------------- recovery
def _teacher(rank: int, strength: float, seed: int = 1):
    """Tiny UNet with a hidden rank-``rank`` change of every target weight, ‖ΔW‖ = strength·‖W‖."""
    unet = _unet("sd15").eval()
    g = torch.Generator().manual_seed(seed)
    truth = {}
    with torch.no_grad():
        for name, mod in unet.named_modules():
            if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS):
                m, n = mod.weight.shape
                d = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
                d *= strength * mod.weight.norm() / d.norm()
                mod.weight += d
                truth[name] = d.clone()
    return unet, truth


def _pool(teacher, n: int, seed: int):
    x0, t, ctx = _inputs(teacher, n, 8, seed)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    from diffusers import DDPMScheduler

    xt = DDPMScheduler(num_train_timesteps=1000).add_noise(x0, noise, t)
    with torch.no_grad():
        target = torch.cat([teacher(xt[i:i + 32], t[i:i + 32], encoder_hidden_states=ctx[i:i + 32]).sample
                            for i in range(0, n, 32)])
    return xt, t, ctx, target


def _eval(unet, pool) -> float:
    xt, t, ctx, target = pool
    with torch.no_grad():
        return float((unet(xt, t, encoder_hidden_states=ctx).sample - target).pow(2).mean())


def recover(method: str, lr: float, train_pool, eval_pool, steps: int, batch: int, eval_every: int,
            rank: int) -> list[tuple[int, float]]:
    student = _unet("sd15")
    opt = _attach(student, method, rank, lr)
    xt, t, ctx, target = train_pool
    g = torch.Generator().manual_seed(7)
    curve = [(0, _eval(student, eval_pool))]
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(xt), (batch,), generator=g)
        loss = (student(xt[idx], t[idx], encoder_hidden_states=ctx[idx]).sample - target[idx]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            curve.append((step, float("inf")))
            break
        if step % eval_every == 0:
            curve.append((step, _eval(student, eval_pool)))
    return curve


GRIDS = {"riemannion": [10.0, 30.0, 100.0, 300.0], "muon": [0.003, 0.01, 0.02], "adamw": [1e-3, 3e-3, 1e-2]}


def recovery(steps: int, batch: int, rank: int, threshold: float, eval_every: int = 10) -> list[dict]:
    teacher, _ = _teacher(rank, strength=0.5)
    train_pool, eval_pool = _pool(teacher, 256, 10), _pool(teacher, 64, 20)
    rows = []
    for method, grid in GRIDS.items():
        best = None
        for lr in grid:
            curve = recover(method, lr, train_pool, eval_pool, steps, batch, eval_every, rank)
            start, final = curve[0][1], curve[-1][1]
            hit = next((s for s, v in curve if v <= threshold * start), None)
            row = {"method": method, "lr": lr, "initial": start, "final": final, "final_rel": final / start,
                   "steps_to_threshold": hit, "curve": curve}
            print(f"  {method:10s} lr={lr:<7g} final/initial={final / start:.4f} steps_to_{threshold:g}={hit}",
                  file=sys.stderr)
            key = (hit if hit is not None else 10**9, final)
            if best is None or key < best[0]:
                best = (key, row)
        rows.append(best[1])
    return rows


# ----------------------------------------------------------------------------- lr sweep
def sweep(rule: str, lrs: list[float], steps: int, n_eval: int = 16) -> list[dict]:
    from riemann_diffusion.state import load_adapter_state_into
    from riemann_diffusion.training import TrainConfig, apply_overrides, train
    from riemann_diffusion.training.session import Session

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        common = {"output_dir": tmp, "max_steps": steps, "validate_every": -1, "checkpoint_every": 0,
                  "progress_bar": False, "rule": rule, "export_formats": ["auto"]}
        evaluator = Session.create(apply_overrides(TrainConfig(), {**common, "lr": 1.0}))
        batches = [evaluator.batch(10_000 + i, 0) for i in range(n_eval)]

        def score():
            with torch.no_grad():
                return statistics.mean(float(evaluator.loss(b)) for b in batches)

        base = score()
        for lr in lrs:
            result = train(apply_overrides(TrainConfig(), {**common, "lr": lr}))
            load_adapter_state_into(evaluator.components, result.state)
            rows.append({"rule": rule, "lr": lr, "eval_loss": score(), "base_eval_loss": base, "steps": steps})
            print(f"  {rule} lr={lr:g}: held-out loss {rows[-1]['eval_loss']:.4f} (base {base:.4f})", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- main
def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_memory":
        kind, method, rank, batch, latent, steps = argv[1:]
        print(json.dumps(memory_child(kind, method, int(rank), int(batch), int(latent), int(steps))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parts", nargs="+", choices=["speed", "recovery", "sweep"])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--latent", type=int, default=8, help="latent side (8 = 64 px images)")
    p.add_argument("--speed-steps", type=int, default=30)
    p.add_argument("--recovery-steps", type=int, default=300)
    p.add_argument("--threshold", type=float, default=0.6, help="held-out loss / initial loss to reach")
    p.add_argument("--sweep-steps", type=int, default=100)
    p.add_argument("--hb-lrs", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0])
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.5])
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if "speed" in args.parts:
        rows = [speed(k, args.rank, args.batch, args.latent, args.speed_steps) | memory(k, args.rank, args.batch,
                                                                                         args.latent)
                for k in ("sd15", "small")]
        results["speed"] = rows
        print(f"\n### Step time and peak memory (rank {args.rank}, batch {args.batch}, latent {args.latent}², CPU)\n")
        print(_table(rows, ["model", "riemannion_s", "adamw_s", "time_ratio", "peak_mib_riemannion",
                            "peak_mib_adamw", "peak_ratio", "train_mib_riemannion", "train_mib_adamw",
                            "train_ratio"]))
    if "recovery" in args.parts:
        rows = recovery(args.recovery_steps, args.batch, args.rank, args.threshold)
        results["recovery"] = rows
        print(f"\n### Recovery of a hidden rank-{args.rank} change (tiny UNet, {args.recovery_steps} steps, "
              f"threshold {args.threshold:g} x initial loss)\n")
        print(_table(rows, ["method", "lr", "steps_to_threshold", "final_rel", "final"]))
    if "sweep" in args.parts:
        rows = sweep("heavy_ball", args.hb_lrs, args.sweep_steps) + sweep("muon", args.muon_lrs, args.sweep_steps)
        results["sweep"] = rows
        print(f"\n### Default-lr sweep (default run, {args.sweep_steps} steps, held-out denoising loss)\n")
        print(_table(rows, ["rule", "lr", "eval_loss", "base_eval_loss"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
