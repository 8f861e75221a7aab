"""Validation images (base vs adapted, same seed), the comparison grid and the loss plot."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..injection import set_adapter_scale

logger = logging.getLogger(__name__)

__all__ = ["generate_images", "save_grid", "plot_loss"]


@torch.no_grad()
def generate_images(pipe, components: dict, prompts: list[str], *, steps: int, guidance_scale: float, seed: int,
                    adapter_scale: float = 1.0, **call_kwargs) -> list[Image.Image]:
    """One image per prompt with the adapters at ``adapter_scale`` (0 = the base model).

    The generator is re-seeded per prompt, so base and adapted images share their noise.
    """
    for module in components.values():
        set_adapter_scale(module, adapter_scale)
    was_training = {name: m.training for name, m in components.items()}
    for m in components.values():
        m.eval()
    try:
        images = []
        for prompt in prompts:
            gen = torch.Generator().manual_seed(seed)
            images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen,
                               **call_kwargs).images[0])
        return images
    finally:
        for name, m in components.items():
            set_adapter_scale(m, 1.0)
            m.train(was_training[name])


def save_grid(columns: list[tuple[str, list[Image.Image]]], prompts: list[str], path) -> Path:
    """A grid: one row per prompt, one labelled column per (label, images) pair; written atomically."""
    path = Path(path)
    cell = max(im.width for _, ims in columns for im in ims)
    cell = max(cell, 96)
    label_h = 14
    grid = Image.new("RGB", (cell * len(columns), (cell + label_h) * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (label, images) in enumerate(columns):
        for r, image in enumerate(images):
            x, y = c * cell, r * (cell + label_h)
            grid.paste(image.resize((cell, cell), Image.NEAREST if image.width < cell else Image.LANCZOS), (x, y + label_h))
            draw.text((x + 2, y + 1), label if r == 0 else "", fill="black")
    tmp = path.with_name(path.name + ".tmp")
    grid.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def plot_loss(records: list[dict], path, title: str = "training loss") -> Path | None:
    """Loss per step and its running mean as a PNG (matplotlib Agg); None if there is nothing to plot."""
    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*points)
    window = max(1, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
              for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, values, lw=0.8, alpha=0.4, label="loss")
    ax.plot(steps, smooth, lw=1.8, label=f"running mean ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
