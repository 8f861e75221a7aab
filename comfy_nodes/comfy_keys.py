"""Turn adapter layers into the state dict ComfyUI's ``comfy.lora.load_lora`` consumes.

ComfyUI applies a LoRA file through a *key map* built from the model
(``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``): LoRA module
name -> model weight key, or ``(weight key, (dim, start, length))`` for a slice of
a fused weight (SD3/Flux q/k/v). A file key whose module name is not in the map is
silently skipped ("lora key not loaded"). This module does the mapping *before*
ComfyUI sees the file, so that nothing is skipped silently:

* :func:`comfy_lora_from_layers` writes parsed layers (ours, kohya, PEFT) under the
  first candidate name the key map knows (``lora_unet_…`` for UNets, where
  PEFT-style ``unet.…to_q`` names would be ignored; ``transformer.…`` for DiTs;
  ``lora_te1_``/``lora_te_``/``text_encoder.…`` for CLIP);
* :func:`comfy_lora_from_tensors` passes any other file ComfyUI understands
  (LoHa, LoKr, DoRA, …) through, renaming only modules it would skip;
* both check every factor's shape against the model weight and report the
  layers that do not fit, with the model family, in words a ComfyUI user can act on.

Inputs here are plain dicts and callables, so the logic runs without ComfyUI.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .paths import NodeInputError

__all__ = ["LayerFactors", "ComfyLora", "comfy_candidates", "split_comfy_key", "is_text_encoder_name",
           "comfy_lora_from_layers", "comfy_lora_from_tensors", "target_shape"]

#: suffixes of the tensors ComfyUI's weight adapters read, longest first.
_SUFFIXES = sorted("""
.lora_up.weight .lora_down.weight .lora_mid.weight _lora.up.weight _lora.down.weight .lora.up.weight
.lora.down.weight .lora_B.weight .lora_A.weight .lora_B.default.weight .lora_A.default.weight .lora_B .lora_A
.lora_linear_layer.up.weight .lora_linear_layer.down.weight .alpha .dora_scale .hada_w1_a .hada_w1_b .hada_w2_a
.hada_w2_b .hada_t1 .hada_t2 .lokr_w1 .lokr_w2 .lokr_w1_a .lokr_w1_b .lokr_w2_a .lokr_w2_b .lokr_t2 .diff .diff_b
.w_norm .b_norm .set_weight .oft_blocks .rescale .reshape_weight .bias .a1.weight .a2.weight .b1.weight .b2.weight
""".split(), key=len, reverse=True)
_SUFFIX_RE = re.compile("(" + "|".join(re.escape(s) for s in _SUFFIXES) + ")$")
_TEXT_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "lora_prior_te")



class LayerFactors(NamedTuple):
    """One plain LoRA layer: ``ΔW = scale · up @ down`` (conv: ``down`` flattened).

    component: ``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2`` …
    module: module path in file form (``down_blocks.0.attentions.0….to_q``), or a
    file's own name (e.g. a kohya stem) when ``component`` is ``""``.
    up: (m, R); down: (R, n) or (R, c, kh, kw) for convolutions.
    """

    component: str
    module: str
    up: Tensor
    down: Tensor
    scale: float = 1.0


@dataclass
class ComfyLora:
    """What a Loader hands to ComfyUI, plus what it could not apply and why."""

    state_dict: dict[str, Tensor]
    applied: dict[str, str] = field(default_factory=dict)  # file layer name -> ComfyUI module name
    skipped_text: list[str] = field(default_factory=list)  # text-encoder layers with no CLIP connected
    unmapped: list[str] = field(default_factory=list)  # names the model has no weight for
    bad_shapes: list[str] = field(default_factory=list)  # "name: LoRA m×n, model a×b"

    def summary(self) -> str:
        lines = [f"applied {len(self.applied)} layers"]
        if self.skipped_text:
            lines.append(f"skipped {len(self.skipped_text)} text-encoder layers (no CLIP connected)")
        if self.unmapped:
            lines.append(f"{len(self.unmapped)} layers not in this model: {', '.join(self.unmapped[:3])}")
        return "; ".join(lines)


def is_text_encoder_name(name: str) -> bool:
    return name.startswith(_TEXT_PREFIXES)


def comfy_candidates(component: str, module: str) -> list[str]:
    """ComfyUI module names for a layer, preferred first (see comfy.lora key maps)."""
    if not component:
        return [module]
    flat = module.replace(".", "_")
    if component == "unet":
        return [f"lora_unet_{flat}", f"unet.{module}", f"lycoris_{flat}"]
    if component == "transformer":
        return [f"transformer.{module}", f"lora_transformer_{flat}", f"lycoris_{flat}"]
    if component == "text_encoder":
        if not module.startswith("text_model."):
            flat = "text_model_" + flat
            module = "text_model." + module
        return [f"lora_te1_{flat}", f"lora_te_{flat}", f"text_encoder.{module}"]
    if component == "text_encoder_2":
        if not module.startswith("text_model."):
            flat = "text_model_" + flat
            module = "text_model." + module
        return [f"lora_te2_{flat}", f"text_encoder_2.{module}"]
    return [f"{component}.{module}", f"lora_{component}_{flat}"]


def split_comfy_key(key: str) -> tuple[str, str] | None:
    """``(module name, suffix)`` of a LoRA file key, or None for keys ComfyUI does not read."""
    m = _SUFFIX_RE.search(key)
    if not m or m.start() == 0:
        return None
    return key[: m.start()], m.group(1)


def target_shape(target, weight_shape: Callable[[str], tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of the model tensor a key-map value points to (a slice for fused weights)."""
    if isinstance(target, tuple):
        shape = list(weight_shape(target[0]))
        dim, _start, length = target[1][:3]
        shape[dim] = length
        return tuple(shape)
    return tuple(weight_shape(target))


def _fits(up: Tensor, down: Tensor, shape: tuple[int, ...]) -> bool:
    m, n = up.shape[0], int(torch.Size(down.shape[1:]).numel())
    return len(shape) >= 2 and shape[0] == m and int(torch.Size(shape[1:]).numel()) == n


def _fmt(shape) -> str:
    return "×".join(str(int(s)) for s in shape)


def _raise_if_unusable(result: ComfyLora, total: int, model_name: str, file_family: str | None, strict: bool):
    family = f" (the file says it is for {file_family})" if file_family else ""
    if total and not result.applied and not result.bad_shapes and result.unmapped:
        raise NodeInputError(
            f"this LoRA does not fit the {model_name} model{family}: none of its {len(result.unmapped)} layers "
            f"exists in it (e.g. {result.unmapped[0]}). Load a LoRA made for this model family.")
    if result.bad_shapes:
        raise NodeInputError(
            f"this LoRA has layers whose shapes do not match the {model_name} model{family}: "
            f"{'; '.join(result.bad_shapes[:3])}"
            f"{f' (and {len(result.bad_shapes) - 3} more)' if len(result.bad_shapes) > 3 else ''}. "
            "It was made for a different base model.")
    if strict and result.unmapped:
        raise NodeInputError(
            f"{len(result.unmapped)} of {total} layers of this LoRA do not exist in the {model_name} model{family}, "
            f"e.g. {', '.join(result.unmapped[:3])}. Turn 'strict' off to apply the {len(result.applied)} "
            "layers that do fit.")


def comfy_lora_from_layers(layers: Iterable[LayerFactors], key_map: Mapping[str, object],
                           weight_shape: Callable[[str], tuple[int, ...]], clip_connected: bool = False,
                           strict: bool = True, model_name: str = "loaded", file_family: str | None = None
                           ) -> ComfyLora:
    """Kohya-style ``<name>.lora_up.weight`` / ``.lora_down.weight`` under ComfyUI's names.

    The scale is folded into ``up`` (no ``.alpha``: ComfyUI's scale is then 1), so
    ComfyUI adds ``strength · scale · up @ down`` exactly. Raises NodeInputError when
    no layer fits, any shape differs, or (``strict``) any layer is missing.
    """
    result = ComfyLora({})
    layers = list(layers)
    for layer in layers:
        label = f"{layer.component}.{layer.module}" if layer.component else layer.module
        names = comfy_candidates(layer.component, layer.module)
        name = next((n for n in names if n in key_map), None)
        if name is None:
            text = layer.component.startswith("text_encoder") or is_text_encoder_name(names[0])
            (result.skipped_text if text and not clip_connected else result.unmapped).append(label)
            continue
        shape = target_shape(key_map[name], weight_shape)
        if not _fits(layer.up, layer.down, shape):
            m, n = layer.up.shape[0], int(torch.Size(layer.down.shape[1:]).numel())
            result.bad_shapes.append(f"{label}: LoRA {m}×{n}, model {_fmt(shape)}")
            continue
        up = layer.up.float() * float(layer.scale)
        down = layer.down.float()
        if down.ndim == 4 and up.ndim == 2:
            up = up[:, :, None, None]
        result.state_dict[f"{name}.lora_up.weight"] = up.contiguous()
        result.state_dict[f"{name}.lora_down.weight"] = down.contiguous()
        result.applied[label] = name
    _raise_if_unusable(result, len(layers), model_name, file_family, strict)
    return result


def _alternatives(module: str) -> list[str]:
    """Other spellings ComfyUI knows for a module name it would skip."""
    for prefix, component in (("unet.", "unet"), ("transformer.", "transformer"),
                              ("text_encoder.", "text_encoder"), ("text_encoder_2.", "text_encoder_2")):
        if module.startswith(prefix):
            return comfy_candidates(component, module[len(prefix):])
    return []


def comfy_lora_from_tensors(tensors: Mapping[str, Tensor], key_map: Mapping[str, object],
                            weight_shape: Callable[[str], tuple[int, ...]], clip_connected: bool = False,
                            strict: bool = True, model_name: str = "loaded", file_family: str | None = None
                            ) -> ComfyLora:
    """Pass a LoRA file ComfyUI understands through, renaming modules it would skip.

    Handles any adapter type ComfyUI reads (LoRA, LoHa, LoKr, DoRA, …); plain
    up/down pairs also get their shapes checked. Keys ComfyUI would not read at
    all count as unmapped.
    """
    modules: dict[str, dict[str, Tensor]] = {}
    stray: list[str] = []
    for key, t in tensors.items():
        parts = split_comfy_key(key)
        if parts is None:
            stray.append(key)
        else:
            modules.setdefault(parts[0], {})[parts[1]] = t
    result = ComfyLora({})
    result.unmapped.extend(stray)
    for module, fields in modules.items():
        name = module if module in key_map else next((n for n in _alternatives(module) if n in key_map), None)
        if name is None:
            (result.skipped_text if is_text_encoder_name(module) and not clip_connected
             else result.unmapped).append(module)
            continue
        up = next((fields[s] for s in (".lora_up.weight", ".lora_B.weight", ".lora_B", "_lora.up.weight",
                                        ".lora.up.weight", ".lora_linear_layer.up.weight", ".lora_B.default.weight")
                   if s in fields), None)
        down = next((fields[s] for s in (".lora_down.weight", ".lora_A.weight", ".lora_A", "_lora.down.weight",
                                          ".lora.down.weight", ".lora_linear_layer.down.weight",
                                          ".lora_A.default.weight") if s in fields), None)
        if (up is None) != (down is None):
            raise NodeInputError(f"layer {module} of this LoRA has only its {'up' if down is None else 'down'} "
                                 "tensor; the file is incomplete or corrupt")
        if up is not None and down is not None and ".lora_mid.weight" not in fields:
            shape = target_shape(key_map[name], weight_shape)
            if not _fits(up.reshape(up.shape[0], -1), down, shape):
                n = int(torch.Size(down.shape[1:]).numel())
                result.bad_shapes.append(f"{module}: LoRA {up.shape[0]}×{n}, model {_fmt(shape)}")
                continue
        for suffix, t in fields.items():
            result.state_dict[name + suffix] = t
        result.applied[module] = name
    _raise_if_unusable(result, len(modules) + len(stray), model_name, file_family, strict)
    return result
