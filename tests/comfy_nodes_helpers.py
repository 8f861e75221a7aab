"""Shared builders for the comfy_nodes tests: trained tiny adapters and their files.

``trained_unet`` puts Riemann adapters on a tiny UNet and takes a few Riemannion
steps, so that X ≠ X0 and the exported update ``X − X0`` is a non-trivial
rank-2r matrix per layer; ``deltas`` reads that update from the layers
themselves (``RiemannLinear.delta_weight``), the reference every file must match.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from riemann_diffusion import Riemannion, adapter_parameters, inject_adapters, iter_adapters
from riemann_diffusion.state import adapter_state, encode_metadata
from riemann_diffusion.tiny import make_tiny_unet

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def trained_unet(kind: str = "sd15", rank: int = 2, steps: int = 2, seed: int = 0):
    """A tiny UNet with Riemann adapters after ``steps`` Riemannion steps on a toy loss."""
    unet = make_tiny_unet(kind, seed=seed)
    inject_adapters(unet, ATTN, rank=rank, init_scale=0.05, seed=seed)
    opt = Riemannion(adapter_parameters(unet), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    text = torch.randn(1, 4, cfg.cross_attention_dim, generator=g)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.zeros(1, 6)}}
    for _ in range(steps):
        out = unet(sample, torch.tensor([10]), encoder_hidden_states=text, **extra).sample
        (1e3 * (out ** 2).mean()).backward()
        opt.step()
        opt.zero_grad()
    return unet


def deltas(unet) -> dict[str, torch.Tensor]:
    """``{diffusers module path: X − X0 (m×n, fp32)}`` of every adapter."""
    return {name: layer.delta_weight().detach().clone() for name, layer in iter_adapters(unet)}


def base_weights(unet) -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight.detach().clone() for name, layer in iter_adapters(unet)}


def linear_shapes(module) -> dict[str, tuple[int, int]]:
    """``{module path: (out, in)}`` of every Linear layer (adapter wrappers seen through)."""
    return {n.removesuffix(".base_layer"): (m.out_features, m.in_features)
            for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def fake_unet_key_map(shapes: dict[str, tuple]) -> tuple[dict, dict]:
    """A ComfyUI-like key map (``lora_unet_<path _>`` -> model key) and the model's weight shapes."""
    key_map = {"lora_unet_" + n.replace(".", "_"): f"diffusion_model.{n}.weight" for n in shapes}
    weights = {f"diffusion_model.{n}.weight": tuple(s) for n, s in shapes.items()}
    return key_map, weights


def write_riemann_state(unet, path: Path) -> Path:
    """Our training state format: flat ``unet.<path>.lora_A|lora_B|lora_A0|lora_B0`` tensors."""
    save_file(adapter_state({"unet": unet}), str(path), metadata=encode_metadata({"family": "sd15", "rank": 2}))
    return path


def write_peft_unet(unet, path: Path) -> Path:
    """diffusers/PEFT naming ``unet.<path>.lora_A.weight`` that ComfyUI half-ignores for SD UNets."""
    sd = {}
    for name, layer in iter_adapters(unet):
        up, down_t = layer.delta_factors()
        sd[f"unet.{name}.lora_A.weight"] = down_t.T.contiguous()
        sd[f"unet.{name}.lora_B.weight"] = up.contiguous()
    save_file(sd, str(path))
    return path


def write_kohya_with_alpha(unet, path: Path, alpha_fraction: float = 0.25) -> Path:
    """Kohya file with ``.alpha = fraction · R`` and ``up`` scaled by 1/fraction: same update, scale ≠ 1."""
    from safetensors.torch import load_file

    from riemann_diffusion.export import save_adapter

    save_adapter(unet, path, format="kohya")
    sd = load_file(str(path))
    for key in [k for k in sd if k.endswith(".alpha")]:
        stem = key[: -len(".alpha")]
        rank = sd[f"{stem}.lora_down.weight"].shape[0]
        sd[key] = torch.tensor(alpha_fraction * rank)
        sd[f"{stem}.lora_up.weight"] = sd[f"{stem}.lora_up.weight"] / alpha_fraction
    save_file(sd, str(path))
    return path
