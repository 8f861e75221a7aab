"""``riemann-diffusion inspect FILE``: format, keys, ranks, targets, provenance, spectra."""

from __future__ import annotations

import argparse
import collections
import json
import re

import torch

from .export import LoraFile, LoraFileError, load_adapter
from .manifold import truncated_svd_factors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a LoRA .safetensors file or a training checkpoint")
    parser.add_argument("--keys", type=int, default=6, metavar="N", help="show the first N keys (default 6)")
    parser.add_argument("--layers", type=int, default=10, metavar="N",
                        help="show the singular values of the first N layers (default 10; -1: all)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def singular_values(lora: LoraFile, name: str) -> torch.Tensor:
    """Singular values of ``scale · up @ down`` from its factors, descending."""
    layer = lora.layers[name]
    return truncated_svd_factors(layer.up.double() * layer.scale, layer.down.double().T)[1].float()


def summarize(lora: LoraFile, n_keys: int = 6, n_layers: int = 10) -> dict:
    """Everything ``inspect`` shows, as a JSON-able dict."""
    keys = sorted(lora.state_dict(lora.format if lora.format in ("kohya", "peft", "diffusers") else None))
    ranks = collections.Counter(lora.ranks().values())
    targets = sorted({re.sub(r"^.*\.\d+\.(?=\D)", "", n.split(".", 1)[1]) for n in lora.layers})
    layers = []
    for name in list(lora.layers)[: None if n_layers < 0 else n_layers]:
        S = singular_values(lora, name)
        top = float(S[0]) if S.numel() else 0.0
        layers.append({"layer": name, "rank": lora.layers[name].rank, "norm": float(S.norm()), "sigma_max": top,
                       "effective_rank": int((S > 1e-3 * top).sum()) if top > 0 else 0,
                       "sigma": [float(f"{float(s):.4g}") for s in S[:8]]})
    return {"file": lora.path, "format": lora.format, "family": lora.family, "layers": len(lora.layers),
            "components": lora.components, "ranks": {str(k): v for k, v in sorted(ranks.items())},
            "targets": targets, "num_keys": len(keys), "keys": keys[:n_keys], "provenance": lora.metadata,
            "singular_values": layers}


def run(args: argparse.Namespace) -> int:
    try:
        lora = load_adapter(args.file)
    except (LoraFileError, ValueError, OSError) as exc:
        print(f"error: {exc}")
        return 2
    info = summarize(lora, args.keys, args.layers)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"file:       {info['file']}")
    print(f"format:     {info['format']}   family: {info['family']}")
    print(f"layers:     {info['layers']} in {', '.join(info['components'])}")
    print("ranks:      " + ", ".join(f"{n} layers of rank {r}" for r, n in info["ranks"].items()))
    print(f"targets:    {', '.join(info['targets'])}")
    print(f"keys:       {info['num_keys']}, e.g.")
    for k in info["keys"]:
        print(f"            {k}")
    print("provenance: " + (json.dumps(info["provenance"], sort_keys=True) if info["provenance"] else "(none)"))
    print("singular values (‖E‖_F, σ_max, effective rank σ > 1e-3·σ_max, leading σ):")
    for row in info["singular_values"]:
        print(f"  {row['layer']}: ‖E‖={row['norm']:.4g} σmax={row['sigma_max']:.4g} "
              f"eff.rank={row['effective_rank']}/{row['rank']} σ={row['sigma']}")
    return 0
