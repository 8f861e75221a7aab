"""``riemann-diffusion export CHECKPOINT --format ... --out FILE [--rank R]``.

CHECKPOINT is a training checkpoint folder (holding ``adapter_state.safetensors``),
that file itself, or an already exported LoRA file (re-formatted / re-ranked).
"""

from __future__ import annotations

import argparse
import logging

from .export import FORMATS, LoraFileError, load_adapter, resize_adapter, write_lora

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="checkpoint folder, its adapter_state.safetensors, or a LoRA .safetensors file")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="auto: kohya for SD1.x/2.x/SDXL UNets, transformer.* PEFT names for SD3/Flux")
    parser.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file (written atomically)")
    parser.add_argument("--rank", type=int, default=None, metavar="R",
                        help="re-compress to rank R by thin SVD (lossy; the relative error is printed)")


def run(args: argparse.Namespace) -> int:
    try:
        lora = load_adapter(args.checkpoint)
        error = 0.0
        if args.rank is not None:
            lora, error = resize_adapter(lora, args.rank)
        fmt = lora.resolve_format(args.format)
        path = write_lora(lora, args.out, fmt)
    except (LoraFileError, ValueError, OSError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {path}: {fmt}, family {lora.family}, {len(lora.layers)} layers, rank {lora.rank}"
          + (f", relative error {error:.3e}" if args.rank is not None else ", exact"))
    return 0
