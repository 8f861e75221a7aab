"""Benchmark (b): optimizer step time on the adapters of the full SD1.5 UNet.

The adapter set is every ``to_q, to_k, to_v, to_out.0`` Linear of the published
SD1.5 UNet (128 layers, shapes read from a meta-device build; no weights). For each
rank, Riemannion (heavy-ball and Muon rules, batched and per-layer paths) steps on
``(A_L: m×r, B: n×r)`` pairs, and torch's AdamW (foreach=True) steps on PEFT-shaped
``(lora_A: r×n, lora_B: m×r)`` tensors: the same number of trainable values.
Gradients are random and fixed; no model runs. Steps are timed round-robin
(warmup, then the median of N repetitions). A torch.profiler breakdown of one
Riemannion configuration says where its time goes.

    python benchmarks/bench_optimizer_step.py            # full (~3-5 min on 2 cores)
    python benchmarks/bench_optimizer_step.py --quick    # smoke (~20 s)
    python benchmarks/bench_optimizer_step.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections import Counter, defaultdict

import torch
from torch import nn

import common
from riemann_diffusion import Riemannion

VARIANTS = [  # (label, rule, batched)
    ("Riemannion heavy_ball, batched", "heavy_ball", True),
    ("Riemannion heavy_ball, per-layer", "heavy_ball", False),
    ("Riemannion muon, batched", "muon", True),
    ("Riemannion muon, per-layer", "muon", False),
]
LRS = {"heavy_ball": 1e-3, "muon": 1e-4}


def sd15_attention_shapes() -> list[tuple[int, int]]:
    """(out_features m, in_features n) of SD1.5's 128 attention projections (meta build)."""
    from diffusers import UNet2DConditionModel

    from riemann_diffusion.tiny import sd15_full_unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_full_unet_config())
    return [
        (mod.out_features, mod.in_features)
        for name, mod in unet.named_modules()
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in common.ATTN_TARGETS)
    ]


def riemann_params(shapes, rank: int, device, gen: torch.Generator) -> list[nn.Parameter]:
    """[A_1, B_1, ...] with orthonormal A_L (m×r), small B (n×r) and random grads, fp32."""
    params = []
    for m, n in shapes:
        A = nn.Parameter(torch.linalg.qr(torch.randn(m, rank, generator=gen))[0].to(device))
        B = nn.Parameter((0.05 * torch.randn(n, rank, generator=gen)).to(device))
        A.grad = (0.01 * torch.randn(m, rank, generator=gen)).to(device)
        B.grad = (0.01 * torch.randn(n, rank, generator=gen)).to(device)
        params += [A, B]
    return params


def peft_params(shapes, rank: int, device, gen: torch.Generator) -> list[nn.Parameter]:
    """[lora_A (r×n), lora_B (m×r), ...] fp32 with random grads (PEFT's layout)."""
    params = []
    for m, n in shapes:
        for shape in ((rank, n), (m, rank)):
            p = nn.Parameter((0.01 * torch.randn(*shape, generator=gen)).to(device))
            p.grad = (0.01 * torch.randn(*shape, generator=gen)).to(device)
            params.append(p)
    return params


def build_optimizers(shapes, rank: int, device) -> tuple[dict, int, int]:
    gen = torch.Generator().manual_seed(rank)
    adam_params = peft_params(shapes, rank, device, gen)
    opts = {"AdamW (foreach)": torch.optim.AdamW(adam_params, lr=1e-4, foreach=True)}
    r_count = 0
    for label, rule, batched in VARIANTS:
        params = riemann_params(shapes, rank, device, gen)  # own copy: steps move the point
        r_count = common.count(params)
        opts[label] = Riemannion(params, lr=LRS[rule], momentum=0.9, rule=rule, batched=batched)
    return opts, common.count(adam_params), r_count


def time_rank(shapes, rank: int, device, warmup: int, reps: int, max_seconds: float) -> list[list[object]]:
    opts, adam_count, r_count = build_optimizers(shapes, rank, device)
    if adam_count != r_count:
        raise RuntimeError(f"trainable counts differ: AdamW {adam_count}, Riemannion {r_count}")
    times = common.interleaved_times({k: o.step for k, o in opts.items()}, device, warmup, reps,
                                     max_seconds=max_seconds, min_reps=min(5, reps))
    for label, opt in opts.items():  # a benchmark that diverged measures nothing useful
        if not all(torch.isfinite(p).all() for g in opt.param_groups for p in g["params"]):
            raise RuntimeError(f"{label}: parameters became non-finite at rank {rank}")
    base = common.median(times["AdamW (foreach)"])
    rows = []
    for label, ts in times.items():
        q = sorted(ts)
        med = common.median(ts)
        rows.append([rank, f"{r_count:,}", label, len(ts), common.fmt(med), f"{common.fmt(q[len(q) // 4])}–{common.fmt(q[(3 * len(q)) // 4])}",
                     common.fmt(common.ratio(med, base))])
    return rows


# ----------------------------------------------------------------------------- profiling
# Instrumentation only for this benchmark: wrap the geometry functions the optimizer
# calls in record_function scopes so the profile reports time per maths step.
# Names missing from the installed library are skipped (the maths may be refactored).
PROFILED_FUNCTIONS = {
    "riemann_diffusion.optimizer": ["tangent_gradient", "orthogonalize", "retract", "transport"],
    "riemann_diffusion.manifold": ["thin_qr", "project", "project_factored", "truncated_svd_factors",
                                   "_tangent_svd", "_extend_basis", "_svd_in_bases", "_apply_split",
                                   "polish_orthonormal"],
}
SCOPES = {n for names in PROFILED_FUNCTIONS.values() for n in names}

OP_CATEGORIES = [  # first match wins; matched against the aten op name
    ("QR (linalg_qr)", ("linalg_qr", "geqrf", "orgqr", "householder")),
    ("SVD (linalg_svd)", ("linalg_svd", "_linalg_svd", "gesdd")),
    ("matmul (matmul/mm/bmm)", ("matmul", "aten::mm", "bmm", "addmm", "baddbmm")),
    ("concat factors (cat)", ("aten::cat",)),
    ("bucket gather/scatter (stack, unbind, copy_)", ("stack", "unbind", "copy_", "clone", "_to_copy", "aten::to")),
    ("elementwise (mul/add/sub/sign/where/...)", ("mul", "add", "sub", "neg", "sign", "where", "ones_like",
                                                   "zeros_like", "fill_", "gt", "div", "rsub")),
    ("views (slice/select/diagonal/transpose)", ("slice", "select", "diagonal", "transpose", "unsqueeze", "view",
                                                 "expand", "alias", "as_strided", "numpy_T", "aten::t", "mT")),
]


@contextlib.contextmanager
def scoped_functions():
    import importlib

    saved = []
    for module_name, names in PROFILED_FUNCTIONS.items():
        module = importlib.import_module(module_name)
        for name in names:
            fn = getattr(module, name, None)
            if fn is None:
                continue

            def wrapped(*a, _fn=fn, _name=name, **k):
                with torch.profiler.record_function(_name):
                    return _fn(*a, **k)

            saved.append((module, name, fn))
            setattr(module, name, functools.wraps(fn)(wrapped))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _scope_path(ev) -> tuple[str, ...]:
    """Names of the profiled scopes enclosing ``ev`` (outermost first), ``ev`` included."""
    path, node = [], ev
    while node is not None:
        if node.name in SCOPES:
            path.append(node.name)
        node = node.cpu_parent
    return tuple(reversed(path))


def _tree_rows(per_path: dict, calls: Counter, steps: int, step_total: float) -> list[list[object]]:
    """Depth-first rows (slowest first at every level) of the scope tree."""
    rows = []

    def visit(prefix: tuple[str, ...]):
        children = [p for p in per_path if len(p) == len(prefix) + 1 and p[: len(prefix)] == prefix]
        for path in sorted(children, key=lambda p: -per_path[p]):
            label = ("  " * (len(path) - 1) + "└ " if len(path) > 1 else "") + path[-1]
            rows.append([label, calls[path] // steps, common.fmt(per_path[path] / 1e3 / steps),
                         f"{100 * per_path[path] / step_total:.0f}%"])
            visit(path)

    visit(())
    return rows


def _category(op_name: str) -> str:
    for label, keys in OP_CATEGORIES:
        if any(k in op_name for k in keys):
            return label
    return "other ops"


def profile_breakdown(shapes, rank: int, device, steps: int) -> str:
    """Per-function and per-op-category breakdown of Riemannion steps (torch.profiler)."""
    opts, _, _ = build_optimizers(shapes, rank, device)
    lines = []
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for label, _, _ in VARIANTS:
        opt = opts[label]
        opt.step()  # warm
        with scoped_functions():
            wall = []
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(steps):
                    with torch.profiler.record_function("STEP"):
                        wall.append(common.time_call(opt.step, device))
        events = prof.events()
        per_path: dict[tuple, float] = defaultdict(float)
        calls: Counter = Counter()
        per_cat: dict[str, float] = defaultdict(float)
        step_total = 0.0
        for ev in events:
            if ev.name == "STEP":
                step_total += ev.cpu_time_total
            elif ev.name in SCOPES:
                path = _scope_path(ev)
                per_path[path] += ev.cpu_time_total
                calls[path] += 1
            elif ev.name.startswith("aten::"):
                parent = ev.cpu_parent
                while parent is not None and not parent.name.startswith("aten::"):
                    parent = parent.cpu_parent
                if parent is None:  # outermost aten op: attribute its whole time (children included)
                    per_cat[_category(ev.name)] += ev.cpu_time_total
        step_ms = step_total / 1e3 / steps
        ops_ms = sum(per_cat.values()) / 1e3 / steps
        lines.append(f"\n**{label}, rank {rank}** (median wall time per step while profiled: "
                     f"{common.fmt(common.median(wall))} ms)\n")
        rows = _tree_rows(per_path, calls, steps, step_total)
        lines.append(common.markdown_table(["function", "calls/step", "ms/step", "share of step"], rows))
        lines.append("")
        rows = [[k, common.fmt(v / 1e3 / steps), f"{100 * v / step_total:.0f}%"]
                for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])]
        rows.append(["Python + dispatch outside aten ops", common.fmt(step_ms - ops_ms),
                     f"{100 * (step_ms - ops_ms) / step_ms:.0f}%"])
        lines.append(common.markdown_table(["op category (outermost aten op, children included)", "ms/step",
                                            "share of step"], rows))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = common.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="ranks (default: 4 16 64; quick: 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3; quick 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 15; quick 3)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="stop adding timed rounds of a rank after this long (at least 5 rounds; default 60)")
    parser.add_argument("--profile-rank", type=int, default=None,
                        help="rank of the profiler breakdown (default 16; quick: first rank); 0 skips it")
    parser.add_argument("--profile-steps", type=int, default=None, help="profiled steps (default 3; quick 1)")
    args = parser.parse_args(argv)
    device = common.setup(args)
    ranks = args.ranks or ([4] if args.quick else [4, 16, 64])
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    reps = args.reps if args.reps is not None else (3 if args.quick else 15)
    profile_rank = args.profile_rank if args.profile_rank is not None else (ranks[0] if args.quick else 16)
    profile_steps = args.profile_steps or (1 if args.quick else 3)

    shapes = sd15_attention_shapes()
    buckets = Counter(shapes)
    common.print_header(
        "Optimizer step time, SD1.5 UNet attention adapters (to_q/k/v/out.0)", device,
        f"{len(shapes)} layers in {len(buckets)} shape buckets "
        f"({', '.join(f'{c}×{m}x{n}' for (m, n), c in sorted(buckets.items()))}); "
        f"adapter tensors fp32 (model dtype {args.dtype} does not enter); warmup {warmup}, median of up to {reps} "
        f"round-robin rounds (fewer once a rank took {args.max_seconds:g} s); lr {LRS}, momentum 0.9",
    )
    rows = []
    for rank in ranks:
        rows += time_rank(shapes, rank, device, warmup, reps, args.max_seconds)
    print(common.markdown_table(["rank", "trainable values", "optimizer", "reps", "median ms", "p25–p75 ms", "× AdamW"], rows))
    print("\nGoal at r=16: Riemannion batched ≤ 3× AdamW.")
    if profile_rank:
        print(f"\n### Where a Riemannion step goes (torch.profiler, rank {profile_rank}, {profile_steps} steps)")
        print("Function times include their children; `└` rows run inside the row above them. The profiler "
              "adds overhead to every op, so shares matter more than absolute ms here.")
        print(profile_breakdown(shapes, profile_rank, device, profile_steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
