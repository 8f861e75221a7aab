"""What the Riemann nodes do, as plain functions (no ComfyUI import).

Every function takes resolved paths or tensors and raises
:class:`~comfy_nodes.paths.NodeInputError` with a message a ComfyUI user can act
on. Files are read and written through :mod:`riemann_diffusion.export`
(``load_adapter``, ``resize_adapter``, ``blend_adapters``, ``write_lora``); only
files that our reader does not know but ComfyUI does (LoHa, LoKr, DoRA, 3×3
conv LoRAs, ...) go to ComfyUI unparsed, through :func:`comfy_lora_for_file`.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .comfy_keys import ComfyLora, LayerFactors, comfy_lora_from_layers, comfy_lora_from_tensors
from .paths import NodeInputError

logger = logging.getLogger(__name__)

__all__ = ["read_adapter", "layers_of", "comfy_lora_for_file", "AdapterSummary", "summarize", "layer_group",
           "singular_values", "spectrum_groups", "resize_file", "blend_files", "output_format",
           "relative_error_text", "TINY_BASES", "train_subject", "image_file_tensor"]

_WRITABLE = ("kohya", "peft", "diffusers")


def _export():
    from riemann_diffusion import export

    return export


def read_adapter(path: str | Path):
    """``riemann_diffusion.export.load_adapter(path)`` with errors a ComfyUI user understands."""
    export = _export()
    try:
        return export.load_adapter(path)
    except export.LoraFileError as exc:
        raise NodeInputError(f"cannot use LoRA file {Path(path).name!r}: {_without_dirs(str(exc), path)}") from None


def _without_dirs(message: str, path) -> str:
    """Error text with the file's folder removed (ComfyUI shows it to possibly remote users)."""
    return message.replace(str(Path(path)), Path(path).name).replace(str(Path(path).parent) + "/", "")


def layers_of(lora) -> list[LayerFactors]:
    """A LoraFile's layers as ``LayerFactors(component, module, up, down, scale)``."""
    out = []
    for name, layer in lora.layers.items():
        component, module = name.split(".", 1)
        out.append(LayerFactors(component, module, layer.up, layer.down, float(layer.scale)))
    return out


def _read_raw(path: Path) -> dict[str, Tensor] | None:
    """Every tensor of a safetensors file, or None when it is not readable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception:  # noqa: BLE001 - any failure means "not a readable safetensors file"
        return None


def comfy_lora_for_file(path: str | Path, key_map: Mapping[str, object],
                        weight_shape: Callable[[str], tuple[int, ...]], clip_connected: bool = False,
                        strict: bool = True, model_name: str = "loaded") -> tuple[ComfyLora, dict]:
    """The state dict ComfyUI's ``comfy.lora.load_lora`` should get for ``path``, checked against a model.

    Returns ``(ComfyLora, info)``; ``info`` has format, family, rank and provenance.
    Our files, kohya and PEFT files are parsed by ``load_adapter`` and renamed to
    names the key map has; other files ComfyUI reads are passed through with the
    same checks. Raises NodeInputError for corrupt files, NaN/Inf values, files for
    another model family and wrong shapes.
    """
    path = Path(path)
    export = _export()
    try:
        lora = export.load_adapter(path)
    except export.LoraFileError as exc:
        raw = _read_raw(path)
        if raw is None:
            raise NodeInputError(f"cannot read LoRA file {path.name!r}: it is not a valid safetensors file "
                                 "(truncated download or corrupt?)") from None
        bad = [k for k, t in raw.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise NodeInputError(f"LoRA file {path.name!r} holds NaN/Inf values (e.g. in {bad[0]}); "
                                 "it is corrupt or was saved from a diverged training run") from None
        logger.info("%s: not a plain LoRA for our reader (%s); passing it to ComfyUI as is", path.name, exc)
        result = comfy_lora_from_tensors(raw, key_map, weight_shape, clip_connected, strict, model_name)
        return result, {"format": "other (passed to ComfyUI)", "family": "unknown", "provenance": {}}
    result = comfy_lora_from_layers(layers_of(lora), key_map, weight_shape, clip_connected, strict, model_name,
                                    file_family=None if lora.family == "unknown" else lora.family)
    info = {"format": lora.format, "family": lora.family, "rank": lora.rank, "provenance": lora.metadata}
    return result, info


# ----------------------------------------------------------------------------- inspect
_BLOCK_PREFIX = re.compile(r"^.*\.\d+\.(?=\D)")


def layer_group(name: str) -> str:
    """``unet attn1.to_q`` for ``unet.down_blocks.0….transformer_blocks.0.attn1.to_q``."""
    component, _, module = name.partition(".")
    return f"{component} {_BLOCK_PREFIX.sub('', module)}".strip()


def singular_values(up: Tensor, down: Tensor, scale: float = 1.0) -> Tensor:
    """Singular values (descending, float64) of ``scale · up @ down`` from the factors only."""
    from riemann_diffusion.manifold import truncated_svd_factors

    _, S, _ = truncated_svd_factors(up.double(), down.double().T)
    return S * abs(float(scale))


def spectrum_groups(lora) -> dict[str, list[Tensor]]:
    """``{group: [singular values of each layer]}`` in first-seen order."""
    groups: dict[str, list[Tensor]] = {}
    for name, layer in lora.layers.items():
        groups.setdefault(layer_group(name), []).append(singular_values(layer.up, layer.down, layer.scale))
    return groups


@dataclass
class AdapterSummary:
    """What the Inspect node reports."""

    file: str
    format: str
    family: str
    rank: int
    num_layers: int
    components: list[str]
    targets: list[str]
    ranks: dict[int, int]  # rank -> number of layers
    provenance: dict

    def text(self) -> str:
        lines = [f"{self.file}: {self.format} LoRA for {self.family}",
                 f"rank {self.rank} ({', '.join(f'{n}× rank {r}' for r, n in self.ranks.items())}), "
                 f"{self.num_layers} layers in {', '.join(self.components)}",
                 "targets: " + ", ".join(self.targets)]
        if self.provenance:
            lines.append("provenance: " + json.dumps(self.provenance, sort_keys=True, default=str))
        else:
            lines.append("provenance: none (not trained with riemann-diffusion)")
        return "\n".join(lines)


def summarize(lora, file_name: str) -> AdapterSummary:
    ranks: dict[int, int] = {}
    for layer in lora.layers.values():
        ranks[layer.rank] = ranks.get(layer.rank, 0) + 1
    targets = sorted({layer_group(n).split(" ", 1)[-1] for n in lora.layers})
    return AdapterSummary(file=file_name, format=lora.format, family=lora.family, rank=lora.rank,
                          num_layers=len(lora.layers), components=lora.components, targets=targets,
                          ranks=dict(sorted(ranks.items())), provenance=dict(lora.metadata))


# ----------------------------------------------------------------------------- resize / blend
def output_format(lora, requested: str = "same") -> str:
    """``requested`` ("same", "auto", "kohya", "peft", "diffusers"); "same" keeps the file's own format."""
    if requested == "same":
        return lora.format if lora.format in _WRITABLE else "auto"
    if requested not in ("auto", *_WRITABLE):
        raise NodeInputError(f"format must be one of same, auto, {', '.join(_WRITABLE)}; got {requested!r}")
    return requested


def _write(lora, out_path: Path, fmt: str) -> Path:
    export = _export()
    try:
        return export.write_lora(lora, out_path, format=fmt)
    except (export.LoraFileError, ValueError) as exc:
        raise NodeInputError(f"cannot write {out_path.name!r} as {fmt}: {_without_dirs(str(exc), out_path)}") from None


def resize_file(src: Path, rank: int, out_path: Path, fmt: str = "same") -> tuple[Path, float, dict]:
    """Truncate every layer of ``src`` to at most ``rank`` (exact SVD truncation) and write it.

    Returns ``(path, relative Frobenius error over all layers, summary dict)``.
    """
    export = _export()
    lora = read_adapter(src)
    try:
        new, rel = export.resize_adapter(lora, int(rank))
    except ValueError as exc:
        raise NodeInputError(f"cannot resize {src.name!r} (largest layer rank {lora.rank}) to rank {rank}: "
                             f"{exc}") from None
    new.metadata = dict(new.metadata, derived_from=src.name)
    fmt = output_format(lora, fmt)
    path = _write(new, out_path, fmt)
    return path, float(rel), {"rank": new.rank, "layers": len(new.layers), "format": new.resolve_format(fmt)}


def blend_files(src_a: Path, src_b: Path, weight_a: float, weight_b: float, out_path: Path,
                fmt: str = "same") -> tuple[Path, dict]:
    """Write ``weight_a · ΔW_a + weight_b · ΔW_b`` exactly (layer ranks add up)."""
    export = _export()
    a, b = read_adapter(src_a), read_adapter(src_b)
    shared = set(a.layers) & set(b.layers)
    if not shared:
        raise NodeInputError(f"{src_a.name!r} and {src_b.name!r} have no layer in common: they were not made for "
                             f"the same base model and targets ({a.family}: {next(iter(a.layers), '-')}, "
                             f"{b.family}: {next(iter(b.layers), '-')})")
    try:
        new = export.blend_adapters(a, b, float(weight_a), float(weight_b))
    except ValueError as exc:
        raise NodeInputError(f"cannot blend {src_a.name!r} and {src_b.name!r}: {exc}") from None
    new.metadata = dict(new.metadata, derived_from=[src_a.name, src_b.name])
    fmt = output_format(a, fmt)
    path = _write(new, out_path, fmt)
    return path, {"rank": new.rank, "layers": len(new.layers), "shared_layers": len(shared),
                  "format": new.resolve_format(fmt), "family": new.family}


def relative_error_text(rel: float) -> str:
    return f"{rel:.3e}" if rel and rel < 1e-3 else f"{rel:.4f}"



# ----------------------------------------------------------------------------- training
#: base models ``riemann_diffusion.training`` builds offline (no download).
TINY_BASES = ("tiny", "tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux")


def train_subject(base_model: str, images_dir: Path | None, prompt: str, steps: int, rank: int, out_path: Path,
                  work_dir: Path, lr: float | None = None, rule: str = "heavy_ball", seed: int = 0,
                  progress: Callable[[int, int, float, float], bool | None] | None = None) -> dict:
    """Short DreamBooth-style training with ``riemann_diffusion.training.train``; the LoRA goes to ``out_path``.

    base_model: one of :data:`TINY_BASES` or a diffusers pipeline folder (already
    resolved inside ComfyUI's ``models/diffusers``). images_dir: subject photos
    (None: the bundled example images). ``progress(step, total, loss, lr)`` may
    return False to stop. Returns a dict with ``steps``, ``final_loss``,
    ``cancelled``, ``seconds``, ``loss_plot`` (path or None) and ``path`` (None when
    cancelled: nothing is written then).
    """
    import shutil

    from riemann_diffusion.training import (ConfigError, DataError, NonFiniteLossError, TrainConfig,
                                            TrainingCancelled, train)

    cfg = TrainConfig()
    cfg.base.model = base_model
    cfg.data.instance_dir = str(images_dir) if images_dir is not None else None
    cfg.data.instance_prompt = prompt.strip() or None
    cfg.adapter.rank = int(rank)
    cfg.optim.rule = rule
    cfg.optim.lr = float(lr) if lr else None
    cfg.run.max_steps = int(steps)
    cfg.run.seed = int(seed)
    cfg.run.output_dir = str(work_dir)
    cfg.run.progress_bar = False
    cfg.validation.validate_every = -1  # no sample images: ComfyUI samples with the LoRA afterwards
    cfg.checkpoint.checkpoint_every = 0
    cfg.export.export_formats = ["auto"]
    try:
        result = train(cfg.validate(), callback=progress)
    except (ConfigError, DataError) as exc:
        raise NodeInputError(f"cannot train: {exc}") from None
    except NonFiniteLossError as exc:
        raise NodeInputError(f"training diverged ({exc}); lower the learning rate") from None
    except TrainingCancelled:
        result = None
    info = {"steps": getattr(result, "steps", 0), "final_loss": getattr(result, "final_loss", None),
            "cancelled": result is None or result.cancelled, "seconds": getattr(result, "seconds", 0.0),
            "loss_plot": getattr(result, "loss_plot_path", None), "path": None}
    if info["cancelled"]:
        return info
    if result.adapter_path is None or not Path(result.adapter_path).is_file():
        raise NodeInputError(f"training finished but wrote no LoRA file: {result.export_error or 'unknown reason'}")
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    shutil.copyfile(result.adapter_path, tmp)
    tmp.replace(out_path)
    info["path"] = out_path
    return info


def image_file_tensor(path: str | Path | None) -> Tensor | None:
    """A PNG/JPEG as a (1, H, W, 3) float tensor in [0, 1] (ComfyUI IMAGE), or None."""
    if path is None or not Path(path).is_file():
        return None
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).unsqueeze(0).contiguous()
