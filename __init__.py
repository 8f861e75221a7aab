"""ComfyUI entry point for a clone of this repository in ``ComfyUI/custom_nodes/``.

ComfyUI imports ``custom_nodes/<folder>/__init__.py`` as a package; the nodes live in
:mod:`comfy_nodes`. This file is not part of the installed ``riemann_diffusion``
package. When something imports it as a plain module (pytest does, for a checkout
whose folder name is not a valid package name), it exports nothing.
"""

__all__ = []

if __package__:
    from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_entrypoint  # noqa: F401

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"]
