"""A singular-value spectrum picture as a ComfyUI IMAGE tensor.

One panel per layer group (``unet attn1.to_q``, ``transformer attn.to_k`` ...):
every layer's singular values σ_i of ΔW on a log scale (thin lines) and the
group's median (thick). Returned as ``(1, H, W, 3)`` float32 in [0, 1], the
layout ComfyUI's IMAGE type uses. Drawn with matplotlib's Agg canvas (no
display, no global pyplot state).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["spectrum_image", "MAX_PANELS"]

MAX_PANELS = 12  # more groups than this are listed in the last panel's title


def _median_curve(values: Sequence[Tensor]) -> np.ndarray:
    length = max(len(v) for v in values)
    table = np.full((len(values), length), np.nan)
    for i, v in enumerate(values):
        table[i, : len(v)] = v.detach().double().cpu().numpy()
    with np.errstate(all="ignore"):
        return np.nanmedian(table, axis=0)


def spectrum_image(groups: Mapping[str, Sequence[Tensor]], title: str = "", width: int = 768,
                   height: int | None = None) -> Tensor:
    """Draw ``{group: [σ of each layer]}``; returns a (1, H, W, 3) float tensor in [0, 1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    names = list(groups)
    shown = names[:MAX_PANELS]
    cols = min(3, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    width = int(width)
    height = int(height) if height else int(width * (0.28 * rows + 0.06))  # about 3:4 panels
    height = max(160, min(height, 4096))
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    if not shown:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no layers", ha="center", va="center")
        ax.set_axis_off()
    for i, name in enumerate(shown):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = [v for v in groups[name] if len(v)]
        for v in values:
            y = v.detach().double().cpu().numpy()
            y = np.where(y > 0, y, np.nan)
            ax.plot(np.arange(1, len(y) + 1), y, color="tab:blue", alpha=0.25, linewidth=0.8)
        if values:
            med = _median_curve(values)
            med = np.where(med > 0, med, np.nan)
            ax.plot(np.arange(1, len(med) + 1), med, color="tab:red", linewidth=2.0, marker="o", markersize=2.5)
            if np.isfinite(med).any():
                ax.set_yscale("log")
        label = f"{name} ({len(values)})"
        if i == len(shown) - 1 and len(names) > len(shown):
            label += f" +{len(names) - len(shown)} groups not shown"
        ax.set_title(label, fontsize=8)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(which="both", labelsize=6)
        ax.grid(True, which="both", alpha=0.25)
    if shown:
        fig.supxlabel("index i", fontsize=7)
        fig.supylabel("σ_i(ΔW)", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    rgb = torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0)
    return rgb.unsqueeze(0).contiguous()
