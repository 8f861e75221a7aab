"""Read a LoRA file into plain data and draw its singular values.

Files are read with :func:`riemann_diffusion.export.load_adapter` (ours, third-party
kohya/PEFT/diffusers files, or a training checkpoint's adapter state), whose layers
carry ``ΔW = scale · up @ down`` (up m×R, down R×n). Singular values come from the
R×R core of two thin QRs, never from a dense m×n matrix.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .inputs import DemoInputError

__all__ = ["LayerInfo", "AdapterReport", "read_lora", "inspect_adapter", "singular_value_plot",
           "lora_singular_values"]

_TARGET_TAIL = re.compile(
    r"(to_[qkv]|to_out[._]0|add_[qkv]_proj|to_add_out|proj_in|proj_out|proj_mlp|ff(?:_context)?[._]net[._]0[._]proj"
    r"|ff(?:_context)?[._]net[._]2|[qkv]_proj|out_proj|fc[12]|norm[._]linear|time_emb_proj|conv\w*)$")


@dataclass
class LayerInfo:
    """One adapted layer: ``name`` as in the file, ΔW shape (m, n), stored rank R."""

    name: str
    shape: tuple[int, int]
    rank: int
    scale: float
    singular_values: list[float]

    @property
    def norm(self) -> float:
        return float(np.sqrt(np.sum(np.square(self.singular_values))))


@dataclass
class AdapterReport:
    """Everything the Inspect tab shows about one adapter file."""

    file: str
    format: str
    family: str
    layers: list[LayerInfo]
    provenance: dict = field(default_factory=dict)
    other_metadata: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return sorted({_target_of(layer.name) for layer in self.layers})

    @property
    def ranks(self) -> dict[int, int]:
        """stored rank -> number of layers with it."""
        out: dict[int, int] = {}
        for layer in self.layers:
            out[layer.rank] = out.get(layer.rank, 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        """JSON-ready overview (no per-layer arrays)."""
        return {"file": self.file, "format": self.format, "family": self.family, "layers": len(self.layers),
                "targets": self.targets, "ranks": {str(k): v for k, v in self.ranks.items()},
                "components": sorted({layer.name.split(".", 1)[0] for layer in self.layers}),
                "provenance": self.provenance, "other_metadata_keys": self.other_metadata}

    def table(self, max_sv: int = 4) -> list[list]:
        """Rows ``[layer, m×n, rank, numerical rank, ‖ΔW‖_F, top singular values]``."""
        rows = []
        for layer in self.layers:
            sv = np.asarray(layer.singular_values)
            numerical = int(np.sum(sv > 1e-6 * sv[0])) if sv.size and sv[0] > 0 else 0
            top = ", ".join(f"{v:.3g}" for v in sv[:max_sv])
            rows.append([layer.name, f"{layer.shape[0]}×{layer.shape[1]}", layer.rank, numerical,
                         round(layer.norm, 6), top])
        return rows

    def to_dict(self) -> dict:
        return {**self.summary(), "layer_details": [asdict(layer) for layer in self.layers]}


def _target_of(name: str) -> str:
    """The target suffix of a layer name (``to_q``, ``to_out.0``, ``ff.net.0.proj``, ...)."""
    match = _TARGET_TAIL.search(name)
    if not match:
        parts = name.rsplit(".", 2)
        return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
    tail = match.group(1)
    # kohya names replace every dot by "_": put the dots of the known dotted targets back
    tail = re.sub(r"^to_out_0$", "to_out.0", tail)
    tail = re.sub(r"^(ff(?:_context)?)_net_(\d)(_proj)?$", lambda m: f"{m[1]}.net.{m[2]}" + (".proj" if m[3] else ""), tail)
    return tail.replace("norm_linear", "norm.linear")


def read_lora(path):
    """``riemann_diffusion.export.load_adapter(path)``, its errors as DemoInputError naming only the file name."""
    from riemann_diffusion.export import LoraFileError, load_adapter

    path = Path(path)
    if not path.is_file():
        raise DemoInputError(f"Adapter file '{path.name}' does not exist.")
    try:
        return load_adapter(path)
    except LoraFileError as exc:
        message = str(exc).replace(str(path), f"'{path.name}'")
        raise DemoInputError(f"Cannot use this adapter: {message}") from None


def lora_singular_values(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values (descending, length R) of ``scale · up @ down`` via thin QRs of both factors."""
    _, R_u = torch.linalg.qr(up.double())
    _, R_d = torch.linalg.qr(down.double().T)
    return torch.linalg.svdvals(R_u @ R_d.T) * abs(scale)


def inspect_adapter(path) -> AdapterReport:
    """Read ``path`` into an :class:`AdapterReport` (raises DemoInputError on bad files)."""
    lora = read_lora(path)
    layers = [LayerInfo(name, (int(layer.up.shape[0]), int(layer.down.shape[1])), layer.rank, float(layer.scale),
                        lora_singular_values(layer.up, layer.down, layer.scale).tolist())
              for name, layer in sorted(lora.layers.items())]
    return AdapterReport(Path(path).name, lora.format, lora.family, layers, dict(lora.metadata),
                         sorted(lora.file_metadata))


def singular_value_plot(report: AdapterReport, max_layers: int = 64) -> Image.Image:
    """A PNG-ready picture: singular values per layer (log scale), one line per layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shown = report.layers[:max_layers]
    top = max((max(layer.singular_values, default=0.0) for layer in shown), default=0.0)
    floor = top * 1e-7  # below this a value is rounding noise of an exactly lower rank: not drawn
    for layer in shown:
        sv = np.asarray(layer.singular_values)
        sv = sv[sv > floor]
        if sv.size:
            ax.plot(np.arange(1, sv.size + 1), sv, marker="o", markersize=3, linewidth=1, alpha=0.6)
    if top > 0:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index i (values below 1e-7·max omitted)")
    ax.set_ylabel("σ_i(ΔW)")
    extra = f", first {len(shown)} shown" if len(report.layers) > len(shown) else ""
    ax.set_title(f"{report.format} LoRA, {len(report.layers)} layers{extra}", fontsize=10, loc="right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy())
