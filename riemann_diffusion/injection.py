"""Put RiemannLinear adapters into any ``nn.Module`` and take them out again.

Target matching follows PEFT: a list (or tuple/set) means "exact module name or
dotted suffix", a string means a regex that must match the full module name, and a
name registered in :data:`PRESETS` expands to its list (see ``presets.py``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from .layer import RiemannLinear, validate_rank

logger = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "inject_adapters",
    "iter_adapters",
    "adapter_parameters",
    "remove_adapters",
    "merge_adapters",
    "unmerge_adapters",
    "set_adapter_scale",
    "match_targets",
]

#: name -> suffix list, full-match regex or callable(model); filled by :mod:`riemann_diffusion.presets`.
PRESETS: dict = {}  # name -> list of names, a regex string, or a callable(model)


def _name_matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]


def _resolve_targets(model: nn.Module, targets) -> str | list[str]:
    if isinstance(targets, str) and targets in PRESETS:
        preset = PRESETS[targets]
        return preset(model) if callable(preset) else preset  # callable: model-dependent ("auto")
    if callable(targets) and not isinstance(targets, str):
        return targets(model)
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise ValueError(
                f"targets={targets!r} is neither a preset ({', '.join(sorted(PRESETS)) or 'none'}) "
                f"nor a valid regex: {exc}"
            ) from None
        return targets
    if isinstance(targets, Iterable):
        out = list(targets)
        if not out or not all(isinstance(t, str) and t for t in out):
            raise ValueError(f"targets must be non-empty module names; got {targets!r}")
        return out
    raise TypeError(f"targets must be a preset name, a regex or a list of names; got {targets!r}")


def match_targets(model: nn.Module, targets) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` selected by ``targets``.

    Raises ValueError listing the Linear modules that exist when nothing matches.
    """
    resolved = _resolve_targets(model, targets)
    linears = _linear_names(model)
    names = [n for n in linears if _name_matches(n, resolved)]
    if not names:
        shown = ", ".join(linears[:40]) + (f", … ({len(linears)} in all)" if len(linears) > 40 else "")
        raise ValueError(
            f"targets {targets!r} match no nn.Linear module of {type(model).__name__}. "
            f"Linear modules that exist: {shown or 'none'}"
        )
    return names


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def inject_adapters(
    model: nn.Module,
    targets=("to_q", "to_k", "to_v", "to_out.0"),
    rank: int = 4,
    init: str = "orthonormal",
    init_scale: float = 1e-3,
    seed: int | None = 0,
    freeze_base: bool = True,
    **init_kwargs,
) -> list[str]:
    """Wrap the selected ``nn.Linear`` modules of ``model`` in :class:`RiemannLinear`.

    Args:
        model: any module (a diffusers UNet/transformer, a text encoder, a toy MLP).
        targets: list of exact names / dotted suffixes, a full-match regex, or a
            preset name (``"sd15"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ...).
        rank: r for every adapter; ValueError if r < 1 or r > min(m, n) of a layer.
        init: ``"orthonormal"`` (random A_L, small B) or ``"loi"`` (needs
            ``batch=...`` and ``loss_fn=...``; see :mod:`riemann_diffusion.loi`).
        init_scale: ‖X0‖/‖W‖ for the orthonormal init.
        seed: seed of the init (None: torch's global RNG).
        freeze_base: set ``requires_grad=False`` on every non-adapter parameter.

    Returns the list of wrapped module names. The model's output is unchanged
    (the frozen start X0 is subtracted).
    """
    if any(isinstance(m, RiemannLinear) for m in model.modules()):
        raise ValueError("model already has Riemann adapters; call remove_adapters(model) first")
    if init not in INITIALIZERS:
        raise ValueError(f"init must be one of {sorted(INITIALIZERS)}; got {init!r}")
    names = match_targets(model, targets)
    modules = dict(model.named_modules())
    for name in names:  # validate every rank before touching the model
        lin = modules[name]
        validate_rank(rank, lin.out_features, lin.in_features, name)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name in names:
        parent_name, child = _split(name)
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, RiemannLinear(modules[name], rank, init_scale, gen, name=name))
    INITIALIZERS[init](model, **init_kwargs)
    logger.info("injected %d Riemann adapters of rank %d", len(names), rank)
    return names


def _init_orthonormal(model: nn.Module, **kwargs):
    if kwargs:
        raise TypeError(f"unexpected arguments for init='orthonormal': {sorted(kwargs)}")


#: init name -> function(model, **kwargs) run after wrapping; ``loi.py`` adds "loi".
INITIALIZERS = {"orthonormal": _init_orthonormal}


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, RiemannLinear]]:
    """Yield ``(module name, RiemannLinear)`` for every adapter in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, RiemannLinear):
            yield name, module


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter tensors, as (A_L, B) pairs in module order.

    This is what :class:`~riemann_diffusion.Riemannion` expects: ``[A_1, B_1, A_2, B_2, ...]``.
    """
    params: list[nn.Parameter] = []
    for _, layer in iter_adapters(model):
        params += [layer.lora_A, layer.lora_B]
    return params


def _replace_adapters(model: nn.Module, fn) -> int:
    count = 0
    for name, layer in list(iter_adapters(model)):
        parent_name, child = _split(name)
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, fn(layer))
        count += 1
    return count


def remove_adapters(model: nn.Module) -> int:
    """Put the original ``nn.Linear`` modules back (bit-for-bit base weights).

    Returns how many adapters were removed. Does not restore ``requires_grad``.
    """

    def unwrap(layer: RiemannLinear) -> nn.Module:
        layer.unmerge()
        return layer.base_layer

    return _replace_adapters(model, unwrap)


def merge_adapters(model: nn.Module, remove: bool = True, safe_merge: bool = True) -> int:
    """Fuse ``scale·(X − X0)`` into each base weight.

    With ``remove=True`` (default) the wrappers are dropped and plain ``nn.Linear``
    modules remain; otherwise the layers stay wrapped and can be unmerged.
    """

    def fuse(layer: RiemannLinear) -> nn.Module:
        layer.merge(safe_merge=safe_merge)
        if remove:
            layer._merged_backup = None
            return layer.base_layer
        return layer

    return _replace_adapters(model, fuse)


def unmerge_adapters(model: nn.Module) -> int:
    """Undo :func:`merge_adapters` (``remove=False``) exactly."""
    n = 0
    for _, layer in iter_adapters(model):
        n += int(layer.merged)
        layer.unmerge()
    return n


def set_adapter_scale(model: nn.Module, scale: float) -> None:
    """Set the inference strength of every adapter (1 = as trained)."""
    for _, layer in iter_adapters(model):
        layer.scale = float(scale)
