"""Export adapters as LoRA files that load in diffusers and ComfyUI, and read LoRA files back.

What is exported (DESIGN.md §7): for every layer the update a user applies to the
untouched base, ``E = X − X0 = [A_L, A0] @ [B, −B0]ᵀ`` (rank ≤ 2r), written exactly
as a rank-R LoRA (R = min(2r, m, n)) from a thin SVD of those factors, with the
singular values split √S between up and down. An optional ``rank=r'`` keeps the
top r' singular triplets and reports the relative Frobenius error it made.

Formats (DESIGN.md §8; names in :mod:`riemann_diffusion.formats`):

* ``"kohya"``: ``lora_unet_…``/``lora_te…`` names with ``.alpha = R`` (scale 1).
  The only naming that loads in both ``pipe.load_lora_weights`` and ComfyUI's
  LoraLoader for SD1.x/2.x/SDXL UNets.
* ``"peft"``: ``<component>.<path>.lora_A.weight``/``lora_B.weight``, no alpha
  (both loaders then use scale 1).
* ``"diffusers"``: ``"peft"`` plus diffusers' ``lora_adapter_metadata`` (LoraConfig
  per component: r = lora_alpha = R, so the scale is 1 whatever the loader infers).
* ``"auto"``: kohya for UNet families (sd15, sdxl), peft for DiTs (sd3, flux, ...).

Reading (:func:`load_adapter`) accepts those, third-party kohya/PEFT files and our
training checkpoints' flat adapter state (``format == "riemann"``). A
:class:`LoraFile` holds ``layers[f"{component}.{module}"] = LoraLayer(up (m, R),
down (R, n), scale)`` whose update is ``scale · up @ down``; module paths are in
file form (CLIP encoders keep ``text_model.``).

Every file is validated in full before a byte is written, and written atomically
(temporary file in the same folder, then ``os.replace``). Provenance goes under our
own metadata key (``state.METADATA_KEY``), never with local paths.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import formats
from .injection import iter_adapters
from .layer import RiemannLinear
from .manifold import truncated_svd_factors
from .presets import DIT_FAMILIES, UNET_FAMILIES, detect_family
from .state import FIELDS, METADATA_KEY, decode_metadata, delta_factors_from_state

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "ExportReport",
    "LoraFile",
    "LoraFileError",
    "LoraLayer",
    "blend_adapters",
    "check_lora_matches",
    "inject_from_lora",
    "lora_from_model",
    "lora_from_state",
    "load_adapter",
    "resize_adapter",
    "save_adapter",
    "write_lora",
]

FORMATS = ("auto", "kohya", "peft", "diffusers")
FORMAT_VERSION = 1
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


class LoraFileError(ValueError):
    """A LoRA file (or what would be written to one) is unusable; the message names the file."""


class LoraLayer(NamedTuple):
    """One layer of a LoRA: the update is ``scale · up @ down`` (m×n)."""

    up: Tensor  # (m, R)
    down: Tensor  # (R, n)
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> Tensor:
        """The dense update (m×n, fp32); for tests and inspection only."""
        return self.scale * (self.up.float() @ self.down.float())


@dataclasses.dataclass
class LoraFile:
    """A LoRA in memory: layers, provenance, the format it came from and its model family.

    Attributes:
        layers: ``{"component.module": LoraLayer(up (m, R), down (R, n), scale)}``,
            update ``scale · up @ down``; module paths in file form.
        format: ``"riemann"`` (our training state), ``"kohya"``, ``"peft"``,
            ``"diffusers"`` or ``"memory"`` (built from a model, not yet written).
        family: ``"sd15"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ... or ``"unknown"``.
        metadata: our provenance dict (``{}`` for third-party files).
        file_metadata: every other safetensors metadata entry of the file (str → str).
        path: where it was read from (None if built in memory).
    """

    layers: dict[str, LoraLayer]
    format: str = "memory"
    family: str = "unknown"
    metadata: dict = dataclasses.field(default_factory=dict)
    file_metadata: dict = dataclasses.field(default_factory=dict)
    path: str | None = None

    @property
    def components(self) -> list[str]:
        return sorted({k.split(".", 1)[0] for k in self.layers})

    def ranks(self) -> dict[str, int]:
        return {k: v.rank for k, v in self.layers.items()}

    @property
    def rank(self) -> int:
        """Largest layer rank (0 for an empty file)."""
        return max(self.ranks().values(), default=0)

    def delta(self, name: str) -> Tensor:
        return self.layers[name].delta()

    def resolve_format(self, format: str | None = None) -> str:
        """The concrete format ``format`` ("auto" or None: kohya for UNets, peft for DiTs) means."""
        fmt = format or (self.format if self.format in FORMATS[1:] else "auto")
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}; got {format!r}")
        if fmt == "auto":
            unet = "unet" in self.components or (self.family in UNET_FAMILIES and "transformer" not in self.components)
            return "kohya" if unet else "peft"
        return fmt

    def state_dict(self, format: str | None = None) -> dict[str, Tensor]:
        """Tensors as written for ``format`` (default: the file's own, else "auto")."""
        fmt = self.resolve_format(format)
        out: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            component, module = name.split(".", 1)
            up, down = layer.up.float().contiguous(), layer.down.float().contiguous()
            if fmt == "kohya":
                key = formats.kohya_name(component, module, self.family)
                out[f"{key}.lora_down.weight"] = down
                out[f"{key}.lora_up.weight"] = up
                out[f"{key}.alpha"] = torch.tensor(float(layer.scale * layer.rank))
            else:
                key = formats.peft_name(component, module)
                out[f"{key}.lora_A.weight"] = down
                out[f"{key}.lora_B.weight"] = (up * layer.scale).contiguous() if layer.scale != 1 else up
        return out

    def file_metadata_for(self, format: str | None = None) -> dict[str, str]:
        """safetensors metadata for ``format``: ours, plus diffusers' LoraConfig for "diffusers"."""
        fmt = self.resolve_format(format)
        meta = {k: v for k, v in self.file_metadata.items() if k not in (METADATA_KEY, DIFFUSERS_METADATA_KEY)}
        meta["format"] = "pt"
        ours = dict(self.metadata)
        ours.update(format_version=FORMAT_VERSION, format=fmt, family=self.family, exported_rank=self.rank)
        meta[METADATA_KEY] = json.dumps(ours, sort_keys=True, default=str)
        if fmt == "diffusers":
            meta[DIFFUSERS_METADATA_KEY] = json.dumps(self._lora_config(), sort_keys=True)
        return meta

    def _lora_config(self) -> dict:
        """diffusers' per-component LoraConfig kwargs, keys prefixed ``component.``."""
        config = {}
        for comp in self.components:
            ranks = {k.split(".", 1)[1]: v.rank for k, v in self.layers.items() if k.startswith(comp + ".")}
            r = max(set(ranks.values()), key=list(ranks.values()).count)
            # PEFT matches target names as dotted suffixes; drop CLIP's "text_model." so the
            # names fit both flattened (transformers 5) and nested CLIPTextModel.
            strip = (lambda p: p[len("text_model."):] if p.startswith("text_model.") else p)
            pattern = {strip(p): v for p, v in ranks.items() if v != r}
            config.update({f"{comp}.r": r, f"{comp}.lora_alpha": r, f"{comp}.rank_pattern": pattern,
                           f"{comp}.alpha_pattern": dict(pattern),
                           f"{comp}.target_modules": sorted(strip(p) for p in ranks),
                           f"{comp}.init_lora_weights": True, f"{comp}.lora_dropout": 0.0,
                           f"{comp}.use_dora": False, f"{comp}.lora_bias": False})
        return config


@dataclasses.dataclass
class ExportReport:
    """What :func:`save_adapter` wrote."""

    path: str
    format: str
    family: str
    num_layers: int
    rank: int  # largest exported layer rank
    relative_error: float  # ‖E − E_r'‖_F / ‖E‖_F over all layers; 0.0 without re-compression
    num_keys: int = 0
    layer_errors: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- maths
def _canonical(up: Tensor, down_t: Tensor, rank: int | None = None) -> tuple[LoraLayer, Tensor, Tensor]:
    """Thin SVD of ``up @ down_t.T`` -> (LoraLayer with √S split, kept S, dropped S)."""
    U, S, V = truncated_svd_factors(up.double(), down_t.double())
    q = S.shape[-1] if rank is None else min(rank, S.shape[-1])
    root = S[:q].sqrt()
    layer = LoraLayer((U[:, :q] * root).float().contiguous(), (V[:, :q] * root).T.float().contiguous(), 1.0)
    return layer, S[:q], S[q:]


def _check_rank(rank, available: int, what: str) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or rank > available:
        raise ValueError(f"rank must be an integer in [1, {available}] ({what}); got {rank!r}")
    return rank


def _resize(lora: LoraFile, rank: int) -> tuple[LoraFile, float, dict[str, float]]:
    _check_rank(rank, max(lora.rank, 1),
                f"re-compression only lowers the rank; the largest layer rank is {lora.rank}")
    out, kept2, dropped2, errors = {}, 0.0, 0.0, {}
    for name, layer in lora.layers.items():
        new, kept, dropped = _canonical(layer.up.float() * layer.scale, layer.down.float().T, rank)
        out[name] = new
        k2, d2 = float((kept ** 2).sum()), float((dropped ** 2).sum())
        kept2, dropped2 = kept2 + k2, dropped2 + d2
        errors[name] = math.sqrt(d2 / (k2 + d2)) if k2 + d2 > 0 else 0.0
    total = kept2 + dropped2
    rel = math.sqrt(dropped2 / total) if total > 0 else 0.0
    meta = dict(lora.metadata, recompressed_rank=rank, relative_error=rel)
    return dataclasses.replace(lora, layers=out, metadata=meta, format="memory", path=None), rel, errors


def resize_adapter(lora: LoraFile, rank: int) -> tuple[LoraFile, float]:
    """Re-compress every layer to at most ``rank`` by thin SVD; returns (new LoraFile, rel. error).

    The error is ``‖E − E_rank‖_F / ‖E‖_F`` with E all layers' updates together
    (0.0 when nothing was cut, or E = 0). The new layers have scale 1 and √S split.
    Raises ValueError when ``rank`` is not in [1, lora.rank].
    """
    new, rel, _ = _resize(lora, rank)
    return new, rel


def blend_adapters(a: LoraFile, b: LoraFile, weight_a: float = 1.0, weight_b: float = 1.0,
                   rank: int | None = None) -> LoraFile:
    """``weight_a · E_a + weight_b · E_b`` per layer, exactly (rank R_a + R_b), or cut to ``rank``.

    Layers present in one file only are kept with their weight. Raises ValueError
    when the families differ or a shared layer has different shapes.
    """
    if "unknown" not in (a.family, b.family) and a.family != b.family:
        raise ValueError(f"cannot blend a {a.family} LoRA ({a.path or 'in memory'}) with a {b.family} LoRA "
                         f"({b.path or 'in memory'})")
    layers = {}
    for name in sorted(set(a.layers) | set(b.layers)):
        ups, downs = [], []
        for lora, w in ((a, weight_a), (b, weight_b)):
            if name in lora.layers:
                layer = lora.layers[name]
                ups.append(layer.up.float() * (layer.scale * float(w)))
                downs.append(layer.down.float())
        shapes = {(u.shape[0], d.shape[1]) for u, d in zip(ups, downs)}
        if len(shapes) > 1:
            raise ValueError(f"cannot blend layer {name}: shapes {sorted(shapes)} differ")
        layers[name] = _canonical(torch.cat(ups, 1), torch.cat(downs, 0).T, rank)[0]
    family = a.family if a.family != "unknown" else b.family
    meta = {"blend": [{"weight": float(weight_a), **a.metadata}, {"weight": float(weight_b), **b.metadata}]}
    return LoraFile(layers=layers, family=family, metadata=meta)


# ----------------------------------------------------------------------------- from models
_PATHLIKE = re.compile(r"^(~|/|\.{1,2}[\\/]|[A-Za-z]:[\\/]|\\\\)|[\\]")


def _scrub(value):
    """Drop anything that looks like a local path (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): v for k, v in ((k, _scrub(v)) for k, v in value.items()) if v is not _DROP}
    if isinstance(value, (list, tuple)):
        return [v for v in map(_scrub, value) if v is not _DROP]
    if isinstance(value, os.PathLike):
        return _DROP
    if isinstance(value, str) and (_PATHLIKE.search(value) or (os.sep in value and os.path.exists(value))):
        return _DROP
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


_DROP = object()


def _target_summary(names) -> list[str]:
    """Module-name suffixes after the last block index: ``attn1.to_out.0``, ``self_attn.q_proj``."""
    return sorted({re.sub(r"^.*\.\d+\.(?=\D)", "", n) for n in names})


def _components_of(model, text_encoder=None, text_encoder_2=None) -> dict[str, nn.Module]:
    comps: dict[str, nn.Module] = {}
    for attr in ("unet", "transformer"):
        part = getattr(model, attr, None)
        if isinstance(part, nn.Module):
            comps[attr] = part
    is_pipeline = bool(comps)
    if not is_pipeline:
        if not isinstance(model, nn.Module):
            raise TypeError(f"save_adapter needs a UNet/transformer or a diffusers pipeline; got {type(model).__name__}")
        comps["transformer" if detect_family(model) in DIT_FAMILIES else "unet"] = model
    for attr, given in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        part = given if given is not None else (getattr(model, attr, None) if is_pipeline else None)
        if isinstance(part, nn.Module):
            comps[attr] = part
    return comps


def lora_from_model(model, *, text_encoder=None, text_encoder_2=None, metadata: Mapping | None = None) -> LoraFile:
    """The exact rank-R LoRA ``X − X0`` of every adapter of a model or pipeline (format "memory")."""
    comps = _components_of(model, text_encoder, text_encoder_2)
    family = detect_family(comps.get("unet") or comps.get("transformer"))
    layers, names, ranks, te_without_out = {}, [], set(), []
    for comp, module in comps.items():
        found = list(iter_adapters(module))
        for name, layer in found:
            up, down_t = layer.delta_factors()
            layers[f"{comp}.{formats.file_module_path(comp, name)}"] = _canonical(up, down_t)[0]
            names.append(name)
            ranks.add(layer.rank)
        if comp in formats.TEXT_ENCODERS and found and not any(n.endswith("out_proj") for n, _ in found):
            te_without_out.append(comp)
    if not layers:
        raise ValueError(f"no Riemann adapters found in {', '.join(comps)}; call inject_adapters first")
    if te_without_out:
        logger.warning("%s adapters without out_proj: diffusers 0.42 cannot load kohya text-encoder files that "
                       "lack out_proj keys (use the 'clip' preset or format='peft')", ", ".join(te_without_out))
    info = {"targets": _target_summary(names), "rank": max(ranks),
            "components": sorted({k.split(".", 1)[0] for k in layers})}
    info.update(_scrub(dict(metadata or {})))
    return LoraFile(layers=layers, family=family, metadata=info)


def lora_from_state(state: Mapping[str, Tensor], metadata: Mapping | None = None, path: str | None = None) -> LoraFile:
    """A LoraFile from a flat adapter state (``state.adapter_state``: X and X0 factors)."""
    info = dict(metadata or {})
    layers = {}
    for key, (up, down_t) in delta_factors_from_state(state).items():
        comp, module = key.split(".", 1)
        layers[f"{comp}.{formats.file_module_path(comp, module)}"] = _canonical(up, down_t)[0]
    lora = LoraFile(layers=layers, format="riemann", metadata=info, path=path)
    lora.family = info.get("family") or _guess_family(lora)
    return lora


def _guess_family(lora: LoraFile) -> str:
    names = list(lora.layers)
    if any(n.startswith("transformer.") for n in names):
        if any(".single_transformer_blocks." in n for n in names):
            return "flux"
        return "sd3" if any(".attn.add_" in n or ".attn.to_add_out" in n for n in names) else "unknown"
    if any(n.startswith("unet.") for n in names):
        if "text_encoder_2" in lora.components or any(".input_blocks." in n or ".add_embedding." in n for n in names):
            return "sdxl"
        k = [v.down.shape[1] for n, v in lora.layers.items() if n.endswith("attn2.to_k")]
        return "sdxl" if k and max(k) == 2048 else "sd15"
    return "unknown"


# ----------------------------------------------------------------------------- writing
def _validate(lora: LoraFile, where: str) -> None:
    if not lora.layers:
        raise LoraFileError(f"{where}: no layers to write")
    for name, layer in lora.layers.items():
        up, down = layer.up, layer.down
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0] or down.shape[0] < 1:
            raise LoraFileError(f"{where}: layer {name} has up {tuple(up.shape)} and down {tuple(down.shape)}; "
                                f"expected (m, R) and (R, n) with R ≥ 1")
        for what, t in (("up", up), ("down", down)):
            if not torch.isfinite(t).all():
                raise LoraFileError(f"{where}: layer {name} {what} holds NaN/Inf values")
        if not math.isfinite(layer.scale):
            raise LoraFileError(f"{where}: layer {name} has scale {layer.scale}")


def _atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise LoraFileError(f"{path}: is a directory; give a file name ending in .safetensors")
    if not path.parent.is_dir():
        raise LoraFileError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_lora(lora: LoraFile, path, format: str = "auto") -> Path:
    """Validate ``lora`` and write it atomically to ``path`` in ``format``; returns the path."""
    fmt = lora.resolve_format(format)
    _validate(lora, str(path))
    if fmt == "kohya":
        for comp in lora.components:
            formats.kohya_prefix(comp, lora.family)  # raises for DiT components
    tensors = lora.state_dict(fmt)
    _atomic_save(tensors, lora.file_metadata_for(fmt), Path(path))
    logger.info("wrote %s LoRA (%d layers, %d keys) to %s", fmt, len(lora.layers), len(tensors), path)
    return Path(path)


def save_adapter(model, path, format: str = "auto", rank: int | None = None, *, text_encoder=None,
                 text_encoder_2=None, metadata: Mapping | None = None) -> ExportReport:
    """Export the adapters of a UNet/DiT (or of a pipeline's parts) as a LoRA file.

    Args:
        model: a UNet/transformer with adapters, or a diffusers pipeline (its
            ``unet``/``transformer`` and ``text_encoder``/``text_encoder_2`` are used).
        path: output ``.safetensors`` file (written atomically).
        format: ``"auto"`` (kohya for UNets, ``transformer.`` PEFT names for DiTs),
            ``"kohya"``, ``"peft"`` or ``"diffusers"`` (PEFT + ``lora_adapter_metadata``).
        rank: optional r' < 2r: lossy re-compression by thin SVD (error reported).
        text_encoder, text_encoder_2: adapted text encoders when ``model`` is not a pipeline.
        metadata: provenance merged into ours (``base_model``, ``optimizer``, ``init``...);
            values that look like local paths are dropped.
    """
    lora = lora_from_model(model, text_encoder=text_encoder, text_encoder_2=text_encoder_2, metadata=metadata)
    rel, errors = 0.0, {}
    if rank is not None:
        lora, rel, errors = _resize(lora, rank)
    fmt = lora.resolve_format(format)
    out = write_lora(lora, path, fmt)
    return ExportReport(path=str(out), format=fmt, family=lora.family, num_layers=len(lora.layers), rank=lora.rank,
                        relative_error=rel, num_keys=len(lora.state_dict(fmt)), layer_errors=errors)


# ----------------------------------------------------------------------------- reading
def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError variants
        raise LoraFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if not tensors:
        raise LoraFileError(f"{path}: holds no tensors")
    return tensors, meta


def _group(tensors: dict[str, Tensor], where: str, module_names=None) -> tuple[str, dict[str, dict]]:
    """Group file keys into layers: (grammar, {"component.module": {"up","down","alpha"}})."""
    grouped: dict[str, dict] = {}
    grammars, unknown = set(), []
    for key, t in tensors.items():
        parsed = formats.parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        grammar, comp, module, field = parsed
        grammars.add(grammar)
        grouped.setdefault(f"{comp}.{module}", {})[field] = (key, t)
    if unknown:
        raise LoraFileError(f"{where}: {len(unknown)} keys are neither kohya (lora_unet_…/lora_te…_…"
                            f".lora_down.weight|.lora_up.weight|.alpha) nor PEFT (<component>.<path>.lora_A|"
                            f"lora_B.weight): {sorted(unknown)[:8]}")
    if len(grammars) > 1:
        raise LoraFileError(f"{where}: mixes kohya and PEFT key names")
    return grammars.pop(), grouped


def _layer_from_group(name: str, fields: dict, where: str) -> LoraLayer:
    missing = [f for f in ("up", "down") if f not in fields]
    if missing:
        present = [k for k, _ in fields.values()]
        raise LoraFileError(f"{where}: layer {name} lacks its {' and '.join(missing)} tensor (has {present})")
    (kd, down), (ku, up) = fields["down"], fields["up"]
    for key, t in ((kd, down), (ku, up)):
        if not t.is_floating_point():
            raise LoraFileError(f"{where}: {key} has dtype {t.dtype}; expected a float tensor")
        if not torch.isfinite(t).all():
            raise LoraFileError(f"{where}: {key} holds NaN/Inf values")
    if down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4 and up.shape[2:] == (1, 1):
        down, up = down[:, :, 0, 0], up[:, :, 0, 0]  # 1×1 conv LoRAs are linear maps
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or down.shape[0] < 1:
        raise LoraFileError(f"{where}: layer {name} has up {tuple(up.shape)} and down {tuple(down.shape)}; "
                            f"expected up (m, R) and down (R, n) with the same R ≥ 1")
    rank = down.shape[0]
    scale = 1.0
    if "alpha" in fields:
        ka, alpha = fields["alpha"]
        if alpha.numel() != 1 or not torch.isfinite(alpha).all():
            raise LoraFileError(f"{where}: {ka} must be a finite scalar; got shape {tuple(alpha.shape)}")
        scale = float(alpha) / rank
    return LoraLayer(up.float(), down.float(), scale)


def load_adapter(path) -> LoraFile:
    """Read a LoRA file: ours, a third-party kohya/PEFT/diffusers file, or our training state.

    ``path`` may also be a training checkpoint folder holding ``adapter_state.safetensors``.
    Raises :class:`LoraFileError` naming the file and the problem (unreadable or
    truncated file, unknown keys, missing up/down, inconsistent shapes, NaN/Inf).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "adapter_state.safetensors").is_file():
            raise LoraFileError(f"{path}: folder without adapter_state.safetensors")
        path = path / "adapter_state.safetensors"
    where = str(path)
    tensors, meta = _read_safetensors(path)
    ours = decode_metadata(meta)
    if all(k.rsplit(".", 1)[-1] in FIELDS for k in tensors):
        for key, t in tensors.items():
            if not torch.isfinite(t).all():
                raise LoraFileError(f"{where}: {key} holds NaN/Inf values")
        try:
            return lora_from_state(tensors, ours, path=where)
        except (KeyError, RuntimeError) as exc:
            raise LoraFileError(f"{where}: broken adapter state: {exc}") from None
    grammar, grouped = _group(tensors, where)
    layers = {name: _layer_from_group(name, fields, where) for name, fields in grouped.items()}
    fmt = grammar if grammar == "kohya" else ("diffusers" if DIFFUSERS_METADATA_KEY in meta else "peft")
    lora = LoraFile(layers=layers, format=fmt, metadata=ours, path=where,
                    file_metadata={k: v for k, v in meta.items() if k != METADATA_KEY})
    lora.family = ours.get("family") or _guess_family(lora)
    return lora


def check_lora_matches(lora: LoraFile, model, component: str | None = None) -> dict[str, str]:
    """Check every layer of ``lora`` for ``component`` against ``model``'s Linear modules.

    Returns ``{layer name: model module path}``; raises LoraFileError naming the file and
    the first layers that are missing from the model (another architecture?) or whose
    shapes differ.
    """
    where = lora.path or "LoRA"
    if component is None:
        component = "transformer" if "transformer" in lora.components else "unet"
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, RiemannLinear))}
    mapping, missing, wrong = {}, [], []
    for name, layer in lora.layers.items():
        comp, module = name.split(".", 1)
        if comp != component:
            continue
        path = formats.model_module_path(comp, module, linears)
        if path is None and lora.format == "kohya":  # kohya names may be rebuilt ambiguously
            try:
                key = formats.kohya_prefix(comp, lora.family) + module.replace(".", "_")
                path = formats.model_module_path(comp, formats.kohya_to_module(key, linears)[1], linears)
            except (KeyError, ValueError):
                path = None
        if path is None:
            missing.append(module)
            continue
        lin = linears[path]
        if (layer.up.shape[0], layer.down.shape[1]) != (lin.out_features, lin.in_features):
            wrong.append(f"{module}: file {layer.up.shape[0]}×{layer.down.shape[1]}, "
                         f"model {lin.out_features}×{lin.in_features}")
        mapping[name] = path
    if missing:
        raise LoraFileError(f"{where}: {len(missing)} {component} layers do not exist in {type(model).__name__} "
                            f"(a LoRA for another architecture, family {lora.family}?): {missing[:5]}")
    if wrong:
        raise LoraFileError(f"{where}: wrong shapes for {type(model).__name__}: {wrong[:5]}")
    if not mapping:
        raise LoraFileError(f"{where}: no {component} layers (file has {lora.components})")
    return mapping


@torch.no_grad()
def inject_from_lora(model: nn.Module, lora: LoraFile, component: str | None = None, rank: int | None = None,
                     floor: float = 1e-3) -> list[str]:
    """Inject adapters at the layers of ``lora`` so the model starts at ``W + E`` (continue training).

    Each layer gets rank r (default: the file's largest rank) and the factors of
    ``E = scale · up @ down`` truncated to r: ``X = U diag(S') Vᵀ`` with singular
    values floored at ``floor · σ_max`` (a point of M_r needs full rank) and
    ``X0 = U diag(S' − S) Vᵀ``, so ``X − X0`` equals the truncated E exactly and a
    later export writes the cumulative update. Checks modules and shapes first
    (:func:`check_lora_matches`). Returns the injected module names.
    """
    from .injection import inject_adapters

    mapping = check_lora_matches(lora, model, component)
    r = rank if rank is not None else max(lora.layers[n].rank for n in mapping)
    names = inject_adapters(model, targets=sorted(set(mapping.values())), rank=r)
    layers = dict(iter_adapters(model))
    for name, path in mapping.items():
        layer, src = layers[path], lora.layers[name]
        U, S, V = truncated_svd_factors(src.up.double() * src.scale, src.down.double().T)
        q = min(r, S.shape[0])
        m, n = layer.out_features, layer.in_features
        if q < r:  # complete the bases with orthonormal columns
            U = torch.linalg.qr(torch.cat([U[:, :q], torch.randn(m, r - q, dtype=U.dtype)], 1))[0]
            V = torch.linalg.qr(torch.cat([V[:, :q], torch.randn(n, r - q, dtype=V.dtype)], 1))[0]
            S = torch.cat([S[:q], S.new_zeros(r - q)])
        U, S, V = U[:, :r], S[:r], V[:, :r]
        top = float(S[0]) if float(S[0]) > 0 else 1e-6
        S_floor = torch.clamp(S, min=floor * top)
        layer.set_start(U, V * S_floor)
        layer.lora_B0.copy_((V * (S_floor - S)).to(layer.lora_B0.dtype))
    logger.info("started %d adapters of rank %d from %s", len(names), r, lora.path or "an in-memory LoRA")
    return names
