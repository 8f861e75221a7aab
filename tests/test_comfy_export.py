"""Opt-in: our exported files through ComfyUI's real key mapping and LoRA loader.

Run with ``COMFYUI_PATH=/path/to/ComfyUI pytest -m comfyui tests/test_comfy_export.py``
(see /work/notes/comfy.md; tests/comfy_support.py imports the checkout on CPU).
Every key of the file must load (no "lora key not loaded") and the patched weight
must equal ``W0 + X − X0``.
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from export_support import denoiser, trained
from riemann_diffusion import inject_adapters, iter_adapters
from riemann_diffusion.export import save_adapter

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout"),
]

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight")


@pytest.fixture(scope="module")
def cs():
    try:
        import comfy_support
    except ImportError:  # pragma: no cover
        from . import comfy_support
    comfy_support.import_comfy(os.environ["COMFYUI_PATH"])
    return comfy_support


def _module_key(file_key: str) -> str:
    return next(file_key[: -len(s)] for s in SUFFIXES if file_key.endswith(s))


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6 + 1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("kind,clip_family", [("sd15", "sd1"), ("sdxl", "sdxl")])
def test_unet_export_loads_fully_in_comfy(cs, kind, clip_family, tmp_path):
    t = trained(kind)
    report = save_adapter(t.pipe, tmp_path / "lora.safetensors")  # auto = kohya, UNet + text encoders
    lora = load_file(report.path)
    model = cs.comfy_model_from_diffusers_unet(denoiser(t.base).state_dict())
    clip = cs.comfy_clip(clip_family, device="meta")
    key_map = cs.comfy_key_map(model, clip)
    assert all(_module_key(k) in key_map for k in lora)  # every exported name is one ComfyUI maps

    patcher, not_loaded = cs.comfy_load_lora(model, lora, clip=clip)

    assert not_loaded == []
    n = 0
    for name, delta in t.deltas.items():
        comp, module = name.split(".", 1)
        if comp != "unet":
            continue
        w0 = t.base.unet.get_submodule(module).weight.detach()
        key = "lora_unet_" + module.replace(".", "_")
        _close(cs.comfy_patched_weight(patcher, key_map[key]), w0 + delta)
        n += 1
    assert n == len(patcher.patches) > 0


def _tiny_sd3_for_comfy():
    """ComfyUI slices SD3's fused qkv at 64·depth: the tiny model needs head dim 64."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=16, num_layers=2, attention_head_dim=64,
                                 num_attention_heads=2, caption_projection_dim=128, joint_attention_dim=64,
                                 pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32).eval()


def _trained_transformer(kind):
    import copy
    if kind == "flux":
        t = trained("flux")
        return t.base.transformer, t.pipe.transformer
    base = _tiny_sd3_for_comfy()
    model = copy.deepcopy(base)
    inject_adapters(model, "auto", rank=2, init_scale=0.05)
    g = torch.Generator().manual_seed(0)
    for _, layer in iter_adapters(model):  # a random point X ≠ X0 on every layer
        A, B = layer.factors()
        layer.set_point(torch.linalg.qr(A + 0.3 * torch.randn(A.shape, generator=g))[0],
                        B + 0.05 * torch.randn(B.shape, generator=g))
    return base, model


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_dit_export_loads_fully_in_comfy(cs, kind, tmp_path):
    base, model = _trained_transformer(kind)
    deltas = {n: layer.delta_weight() for n, layer in iter_adapters(model)}
    report = save_adapter(model, tmp_path / "lora.safetensors")
    lora = load_file(report.path)
    assert report.format == "peft" and all(k.startswith("transformer.") for k in lora)
    comfy_model = cs.comfy_model_from_diffusers_transformer(base.state_dict())
    key_map = cs.comfy_key_map(comfy_model)

    patcher, not_loaded = cs.comfy_load_lora(comfy_model, lora)

    assert not_loaded == []
    assert max(d.abs().max() for d in deltas.values()) > 1e-3
    for name, delta in deltas.items():
        w0 = base.get_submodule(name).weight.detach()
        _close(cs.comfy_patched_weight(patcher, key_map[f"transformer.{name}"]), w0 + delta)


def test_text_encoder_names_of_dit_pipelines_map_to_clip_l(cs, tmp_path):
    t = trained("flux")
    lora = load_file(save_adapter(t.pipe, tmp_path / "lora.safetensors").path)
    te_keys = {_module_key(k) for k in lora if k.startswith("text_encoder.")}
    assert te_keys and te_keys <= set(cs.comfy_key_map(None, cs.comfy_clip("sd1", device="meta")))
