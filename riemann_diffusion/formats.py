"""LoRA file key naming: kohya and PEFT/diffusers grammars, both ways (DESIGN.md §8).

A layer is named inside this package by ``(component, module)``: the pipeline
attribute (``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``) and the
module path in *file form*. File form equals the diffusers module path, except that
CLIP text-encoder paths always start with ``text_model.`` (recent transformers
flattened ``CLIPTextModel``, but every LoRA file and loader keeps the prefix).

Grammars written and read here:

* kohya (UNets): ``lora_unet_<path, . → _>.lora_down.weight`` [R, n],
  ``.lora_up.weight`` [m, R], ``.alpha`` (scalar; scale = alpha / R). Text
  encoders: ``lora_te_`` (SD1.x/2.x), ``lora_te1_`` / ``lora_te2_`` (SDXL), over
  ``text_model_encoder_layers_<i>_self_attn_q_proj`` style names.
* PEFT / diffusers: ``<component>.<path>.lora_A.weight`` [R, n] and
  ``.lora_B.weight`` [m, R]; no alpha (scale 1 in both loaders).

Kohya names lose the dots, so turning one back into a module path is ambiguous in
general: :func:`kohya_to_module` resolves it exactly against the module names of a
model when given them, and otherwise with a vocabulary of the identifiers that
contain underscores in diffusers and CLIP models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "KOHYA_KEY_RE",
    "PEFT_KEY_RE",
    "TEXT_ENCODERS",
    "kohya_prefix",
    "kohya_name",
    "kohya_to_module",
    "peft_name",
    "file_module_path",
    "model_module_path",
    "parse_key",
]

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
#: the kohya grammar: prefix, name of [A-Za-z0-9_], then one of three fields.
KOHYA_KEY_RE = re.compile(r"^(lora_unet|lora_te|lora_te1|lora_te2)_([A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
PEFT_KEY_RE = re.compile(r"^([A-Za-z0-9_]+)\.([A-Za-z0-9_.]+)\.(lora_A|lora_B)\.weight$")
_CLIP_TOP = ("encoder.", "embeddings.", "final_layer_norm")

# Identifiers that contain "_" in diffusers UNets/DiTs, CLIP, and kohya's LDM names;
# longest first so "single_transformer_blocks" wins over "transformer_blocks".
_COMPOUNDS = sorted(
    (tuple(w.split("_")) for w in """
    single_transformer_blocks transformer_blocks down_blocks up_blocks mid_block to_q to_k to_v to_out
    to_add_out add_q_proj add_k_proj add_v_proj proj_in proj_out proj_mlp time_emb_proj conv_shortcut
    conv_in conv_out conv_norm_out time_embedding linear_1 linear_2 add_embedding norm1_context ff_context
    context_embedder x_embedder time_text_embed text_embedder timestep_embedder guidance_embedder norm_out
    pos_embed caption_projection text_model self_attn q_proj k_proj v_proj out_proj final_layer_norm
    layer_norm1 layer_norm2 token_embedding position_embedding text_projection input_blocks output_blocks
    middle_block emb_layers in_layers out_layers skip_connection time_embed label_emb norm_added_q
    norm_added_k add_out
    """.split()),
    key=len,
    reverse=True,
)


def kohya_prefix(component: str, family: str) -> str:
    """``lora_unet_``, ``lora_te_`` (SD1.x/2.x), ``lora_te1_``/``lora_te2_`` (SDXL).

    Raises ValueError for components kohya files do not name (DiT transformers).
    """
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if family == "sdxl" else "lora_te_"
    if component == "text_encoder_2" and family == "sdxl":
        return "lora_te2_"
    raise ValueError(
        f"kohya names cover SD1.x/2.x/SDXL UNets and their CLIP text encoders; got component "
        f"{component!r} of family {family!r}. Use format='peft' or 'diffusers' for DiT models."
    )


def file_module_path(component: str, module: str) -> str:
    """Module path as written in LoRA files (``text_model.`` added for CLIP encoders)."""
    if component in TEXT_ENCODERS and module.startswith(_CLIP_TOP):
        return "text_model." + module
    return module


def model_module_path(component: str, module: str, module_names: Iterable[str]) -> str | None:
    """The model's own path for a file-form ``module``; None when the model lacks it."""
    names = set(module_names)
    if module in names:
        return module
    if component in TEXT_ENCODERS and module.startswith("text_model."):
        short = module[len("text_model."):]
        if short in names:
            return short
    return None


def kohya_name(component: str, module: str, family: str) -> str:
    """``lora_unet_down_blocks_1_..._to_out_0`` for (component, file-form module path)."""
    return kohya_prefix(component, family) + file_module_path(component, module).replace(".", "_")


def peft_name(component: str, module: str) -> str:
    """``unet.down_blocks.1....to_q`` (append ``.lora_A.weight`` / ``.lora_B.weight``)."""
    return f"{component}.{file_module_path(component, module)}"


def _join_tokens(tokens: list[str]) -> str:
    parts, i = [], 0
    while i < len(tokens):
        for comp in _COMPOUNDS:
            if tuple(tokens[i : i + len(comp)]) == comp:
                parts.append("_".join(comp))
                i += len(comp)
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def kohya_to_module(name: str, module_names: Iterable[str] | None = None) -> tuple[str, str]:
    """``lora_unet_..._to_q`` -> ``(component, file-form module path)``.

    With ``module_names`` (a model's module paths; for text encoders either form)
    the match is exact and a name that matches nothing raises KeyError; without, the
    path is rebuilt from a vocabulary of underscore identifiers (diffusers layout).
    """
    m = re.match(r"^(lora_unet|lora_te|lora_te1|lora_te2)_(.+)$", name)
    if not m:
        raise ValueError(f"not a kohya LoRA name: {name!r}")
    component = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                 "lora_te2": "text_encoder_2"}[m.group(1)]
    body = m.group(2)
    if module_names is not None:
        table = {file_module_path(component, n).replace(".", "_"): file_module_path(component, n)
                 for n in module_names}
        if body not in table:
            raise KeyError(f"kohya name {name!r} matches no module of the model")
        return component, table[body]
    return component, _join_tokens(body.split("_"))


def parse_key(key: str) -> tuple[str, str, str, str] | None:
    """Classify one tensor key of a LoRA file.

    Returns ``(grammar, component, module, field)`` with grammar ``"kohya"`` or
    ``"peft"``, field ``"up"``, ``"down"`` or ``"alpha"``; None for unknown keys.
    """
    m = KOHYA_KEY_RE.match(key)
    if m:
        component, module = kohya_to_module(f"{m.group(1)}_{m.group(2)}")
        field = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group(3)]
        return "kohya", component, module, field
    m = PEFT_KEY_RE.match(key)
    if m:
        return "peft", m.group(1), m.group(2), "down" if m.group(3) == "lora_A" else "up"
    return None
