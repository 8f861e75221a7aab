"""Adapter state as flat tensors: what training checkpoints store and export reads.

Keys are ``<component>.<module path>.<field>`` with field in ``lora_A`` (A_L, m×r),
``lora_B`` (B, n×r), ``lora_A0``, ``lora_B0`` (the frozen start X0) and component a
pipeline attribute name (``unet``, ``transformer``, ``text_encoder``, ...). The
exported update of a layer is ``X − X0 = [A_L, A0] @ [B, −B0]ᵀ`` (DESIGN.md §7).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .injection import iter_adapters
from .layer import delta_factors

__all__ = ["FIELDS", "METADATA_KEY", "adapter_state", "load_adapter_state_into", "delta_factors_from_state",
           "encode_metadata", "decode_metadata"]

FIELDS = ("lora_A", "lora_B", "lora_A0", "lora_B0")
#: safetensors metadata key holding our provenance JSON (loaders ignore it).
METADATA_KEY = "riemann_diffusion"


def adapter_state(components: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """Flat ``{component.module.field: tensor}`` of every adapter in ``components``."""
    out: dict[str, Tensor] = {}
    for comp, model in components.items():
        for name, layer in iter_adapters(model):
            for field in FIELDS:
                out[f"{comp}.{name}.{field}"] = getattr(layer, field).detach().contiguous()
    return out


@torch.no_grad()
def load_adapter_state_into(components: Mapping[str, nn.Module], state: Mapping[str, Tensor]) -> int:
    """Copy a flat adapter state into already-injected models; returns layers loaded.

    Raises KeyError naming missing or unexpected keys, ValueError on shape mismatch.
    """
    expected = set()
    n = 0
    for comp, model in components.items():
        for name, layer in iter_adapters(model):
            for field in FIELDS:
                key = f"{comp}.{name}.{field}"
                expected.add(key)
                if key not in state:
                    raise KeyError(f"adapter state lacks {key!r}")
                dst = getattr(layer, field)
                if tuple(state[key].shape) != tuple(dst.shape):
                    raise ValueError(f"{key}: expected shape {tuple(dst.shape)}, got {tuple(state[key].shape)}")
                dst.copy_(state[key])
            n += 1
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise KeyError(f"adapter state has keys for layers the model lacks: {unexpected[:5]}")
    return n


def delta_factors_from_state(state: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{component.module: (up (m, 2r), down (n, 2r))}`` with ``up @ down.T = X − X0``."""
    layers = sorted({k.rsplit(".", 1)[0] for k in state if k.rsplit(".", 1)[-1] in FIELDS})
    out = {}
    for layer in layers:
        try:
            A, B, A0, B0 = (state[f"{layer}.{f}"].float() for f in FIELDS)
        except KeyError as exc:
            raise KeyError(f"adapter state for {layer!r} lacks {exc.args[0]!r}") from None
        out[layer] = delta_factors(A, B, A0, B0)
    return out


def encode_metadata(info: Mapping) -> dict[str, str]:
    """safetensors metadata (str → str) carrying ``info`` as JSON under our key."""
    return {METADATA_KEY: json.dumps(dict(info), sort_keys=True, default=str)}


def decode_metadata(metadata: Mapping[str, str] | None) -> dict:
    """Inverse of :func:`encode_metadata`; {} when the file has none of ours."""
    if not metadata or METADATA_KEY not in metadata:
        return {}
    try:
        return json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        return {}
