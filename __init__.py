"""ComfyUI entry point for a clone of this repository in ``ComfyUI/custom_nodes/``.

ComfyUI imports ``custom_nodes/<folder>/__init__.py``; the nodes live in
:mod:`comfy_nodes`. This file is not part of the installed ``riemann_diffusion``
package and is never imported by it, by pytest or by setuptools.
"""
from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_entrypoint  # noqa: F401

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"]
