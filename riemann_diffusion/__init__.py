"""riemann-diffusion: fixed-rank LoRA adapters for diffusion models, trained with Riemannion.

Quick start::

    from riemann_diffusion import inject_adapters, adapter_parameters, Riemannion
    inject_adapters(unet, targets=["to_q", "to_k", "to_v", "to_out.0"], rank=8)
    opt = Riemannion(adapter_parameters(unet), lr=1e-3, momentum=0.9)
"""

from importlib import import_module

from .injection import (
    adapter_parameters,
    inject_adapters,
    iter_adapters,
    match_targets,
    merge_adapters,
    remove_adapters,
    set_adapter_scale,
    unmerge_adapters,
)
from .layer import RiemannLinear
from .optimizer import Riemannion, riemannion_update
from . import loi, presets  # noqa: F401,E402  (register INITIALIZERS["loi"] and PRESETS)

__version__ = "0.1.0"

# Heavier pieces (diffusers-aware) load on first use.
_LAZY = {
    "save_adapter": "riemann_diffusion.export",
    "load_adapter": "riemann_diffusion.export",
    "resize_adapter": "riemann_diffusion.export",
    "blend_adapters": "riemann_diffusion.export",
    "train": "riemann_diffusion.training",
    "TrainConfig": "riemann_diffusion.training",
}

__all__ = [
    "RiemannLinear",
    "Riemannion",
    "adapter_parameters",
    "inject_adapters",
    "iter_adapters",
    "match_targets",
    "merge_adapters",
    "remove_adapters",
    "riemannion_update",
    "set_adapter_scale",
    "unmerge_adapters",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'riemann_diffusion' has no attribute {name!r}")
