"""Target presets per model family (DESIGN.md §9) and model-family detection.

Importing this module fills :data:`riemann_diffusion.injection.PRESETS`:

========== ==================================================================
``sd15``   SD1.x/2.x UNet: ``to_q, to_k, to_v, to_out.0`` (+ ``add_k_proj``,
           ``add_v_proj`` where the UNet has them)
``sdxl``   SDXL UNet: ``to_q, to_k, to_v, to_out.0``
``sd3``    SD3 transformer: ``attn.to_q/k/v``, ``attn.to_out.0``,
           ``attn.add_q/k/v_proj``, ``attn.to_add_out``
``flux``   Flux transformer: the SD3 list in the double blocks, plus the single
           blocks' ``attn.to_q/k/v`` and ``proj_out`` (a regex, so the model's
           final ``proj_out`` is not taken)
``flux_ff`` ``flux`` plus the double blocks' feed-forwards (``ff.net.0.proj``,
           ``ff.net.2``, ``ff_context.net.0.proj``, ``ff_context.net.2``)
``sana``,  attention ``to_q, to_k, to_v, to_out.0`` of Sana / PixArt-α/Σ
``pixart``
``clip``   CLIP text encoders: ``q_proj, k_proj, v_proj, out_proj``
``auto``   the preset of :func:`detect_family` of the model it is applied to
========== ==================================================================

A list preset means "exact module name or dotted suffix"; a string preset is a
regex that must match the full module name (the matching rules of injection.py).
"""

from __future__ import annotations

from torch import nn

from .injection import PRESETS

__all__ = ["FAMILY_PRESETS", "detect_family", "default_targets", "UNET_FAMILIES", "DIT_FAMILIES"]

_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
_SD3 = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_FLUX_DOUBLE = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_FLUX_SINGLE = r"single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_out)"
_FLUX_FF = r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"

#: preset name -> targets (list: exact name / dotted suffix; str: full-match regex).
FAMILY_PRESETS: dict[str, list[str] | str] = {
    "sd15": _ATTN + ["add_k_proj", "add_v_proj"],
    "sdxl": list(_ATTN),
    "sd3": list(_SD3),
    "flux": f"{_FLUX_DOUBLE}|{_FLUX_SINGLE}",
    "flux_ff": f"{_FLUX_DOUBLE}|{_FLUX_SINGLE}|{_FLUX_FF}",
    "sana": list(_ATTN),
    "pixart": list(_ATTN),
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
}

#: families whose denoiser is a UNet (kohya file names) / a transformer (``transformer.`` names).
UNET_FAMILIES = ("sd15", "sdxl")
DIT_FAMILIES = ("sd3", "flux", "sana", "pixart")

# class name of the denoiser / encoder -> family (classes are matched by name so this
# module does not import diffusers or transformers).
_CLASS_FAMILY = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "SanaTransformer2DModel": "sana",
    "PixArtTransformer2DModel": "pixart",
    "CLIPTextModel": "clip",
    "CLIPTextModelWithProjection": "clip",
}


def _denoiser(obj):
    """The UNet / transformer of a diffusers pipeline, or ``obj`` itself."""
    for attr in ("unet", "transformer"):
        part = getattr(obj, attr, None)
        if isinstance(part, nn.Module):
            return part
    return obj


def detect_family(model_or_pipeline) -> str:
    """Model family of a diffusers denoiser, a pipeline or a CLIP text encoder.

    Returns ``"sd15"`` (SD1.x/2.x UNets), ``"sdxl"`` (a UNet with SDXL's
    ``text_time`` added conditioning), ``"sd3"``, ``"flux"``, ``"sana"``,
    ``"pixart"`` or ``"clip"``. Raises ValueError naming the class otherwise.
    """
    model = _denoiser(model_or_pipeline)
    name = type(model).__name__
    if name == "UNet2DConditionModel":
        config = getattr(model, "config", None)
        return "sdxl" if getattr(config, "addition_embed_type", None) == "text_time" else "sd15"
    if name in _CLASS_FAMILY:
        return _CLASS_FAMILY[name]
    raise ValueError(
        f"cannot detect the model family of {name}; known: UNet2DConditionModel, {', '.join(_CLASS_FAMILY)}. "
        f"Pass targets explicitly (a preset name such as {sorted(FAMILY_PRESETS)}, a list or a regex)."
    )


def default_targets(model: nn.Module) -> list[str] | str:
    """The preset targets of ``detect_family(model)`` (what ``targets="auto"`` uses)."""
    return FAMILY_PRESETS[detect_family(model)]


PRESETS.update(FAMILY_PRESETS)
PRESETS["auto"] = default_targets
