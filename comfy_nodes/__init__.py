"""ComfyUI custom nodes for Riemann (and ordinary kohya/PEFT) LoRA adapters.

Install: put this repository (or a link to ``comfy_nodes/``) in
``ComfyUI/custom_nodes/``, and ``pip install -e <repo>`` into ComfyUI's Python
(or let this package add the repository root to ``sys.path`` when
``riemann_diffusion`` is not installed). Nodes, in the "Riemann LoRA" category:

* Riemann LoRA Loader: MODEL (+ optional CLIP) patched through ComfyUI's own LoRA code;
* Riemann LoRA Inspect: rank, targets, provenance, singular-value spectrum (IMAGE);
* Riemann LoRA Resize: exact SVD truncation to a smaller rank, saved to models/loras;
* Riemann LoRA Blend: weighted sum of two LoRAs of one base, saved as one file;
* Riemann LoRA Train: short subject training (diffusers base folder or "tiny").

Importing this package is cheap: no torch work, no device lookups. ComfyUI
reads ``NODE_CLASS_MAPPINGS`` (older builds) or calls ``comfy_entrypoint()`` (V3).
"""
from __future__ import annotations

import importlib.util
import os
import sys


def _ensure_library_importable() -> None:
    """Add the repository root to sys.path when riemann_diffusion is not installed."""
    if importlib.util.find_spec("riemann_diffusion") is not None:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "riemann_diffusion", "__init__.py")) and root not in sys.path:
        sys.path.append(root)


_ensure_library_importable()

from ._compat import ComfyExtension  # noqa: E402
from .nodes import NODES  # noqa: E402

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RiemannLoraLoader": "Riemann LoRA Loader",
    "RiemannLoraInspect": "Riemann LoRA Inspect",
    "RiemannLoraResize": "Riemann LoRA Resize",
    "RiemannLoraBlend": "Riemann LoRA Blend",
    "RiemannLoraTrain": "Riemann LoRA Train",
}


class RiemannLoraExtension(ComfyExtension):
    async def get_node_list(self) -> list:
        return list(NODES)


async def comfy_entrypoint() -> RiemannLoraExtension:
    """V3 entry point: ComfyUI awaits this and registers every node's schema id."""
    return RiemannLoraExtension()


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint", "RiemannLoraExtension"]
