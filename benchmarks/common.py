"""Shared helpers of the benchmark scripts: flags, timing, PEFT baselines, tables.

The scripts in this folder import it as ``common`` (run them as
``python benchmarks/<script>.py``; Python puts the script's folder on ``sys.path``).
Nothing here is library code: it prints, and it may be slow to import.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- flags
def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every benchmark accepts: --quick, --device, --dtype, --threads."""
    parser.add_argument("--quick", action="store_true", help="tiny run (~20 s) for the smoke test")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="model dtype (default: fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads, check --device, return the torch.device."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available in this torch build ({torch.__version__})")
    return device


def command_line() -> str:
    """The command that started this process, ready to paste into a shell."""
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def print_header(title: str, device: torch.device, extra: str = "") -> None:
    """Markdown heading plus the command line and the environment of this run."""
    print(f"## {title}\n")
    print(f"Command: `{command_line()}`  ")
    env = (
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load average at start {load_average()}"
    )
    if device.type == "cuda":
        env += f", {torch.cuda.get_device_name(device)}"
    print(f"Environment: {env}" + (f"  \n{extra}" if extra else ""))
    print()


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call in milliseconds (synchronized on CUDA)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int,
    reps: int,
    max_seconds: float | None = None,
    min_reps: int = 5,
) -> dict[str, list[float]]:
    """Time each function ``reps`` times, round-robin (A, B, C, A, B, C, ...).

    Interleaving spreads the noise of a shared machine evenly over the compared
    configurations. ``warmup`` untimed rounds come first. With ``max_seconds``,
    rounds stop once that much time went into timed rounds and at least
    ``min_reps`` were done. Returns name -> list of ms.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(reps):
        if max_seconds is not None and i >= min_reps and time.perf_counter() - start > max_seconds:
            break
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(b) else float("nan")


# ----------------------------------------------------------------------------- PEFT baseline
def peft_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float | None = None) -> nn.Module:
    """Add PEFT LoRA adapters in place (default init: A kaiming-uniform, B zero).

    ``lora_alpha`` defaults to the rank (scale 1), the usual DreamBooth setting.
    Only the LoRA factors stay trainable. Returns the same model.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(targets),
                        lora_dropout=0.0, init_lora_weights=True)
    return inject_adapter_in_model(config, model)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- memory
def rss_status_kib() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of this process in KiB, from /proc/self/status (Linux)."""
    text = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux ≥ 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- output
def fmt(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are str()-ed."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
