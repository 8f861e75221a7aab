"""Helpers for the demo tests: adapter files with a visible effect, a server on localhost."""

from __future__ import annotations

import contextlib
import os
import socket

import numpy as np
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

PROMPT = "a photo of sks toy"
FAST = dict(steps=2, guidance=7.5, seed=3, resolution=64)


def adapted_pipeline(kind: str = "sd15", seed: int = 0, rank: int = 2, bump: float = 0.5):
    """A tiny pipeline whose UNet carries Riemann adapters moved away from X0 (so X − X0 ≠ 0)."""
    from riemann_diffusion import inject_adapters, iter_adapters
    from riemann_diffusion.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline(kind)
    inject_adapters(pipe.unet, rank=rank, init_scale=0.05, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, layer in iter_adapters(pipe.unet):
            layer.lora_B.add_(bump * torch.randn(layer.lora_B.shape, generator=g))
    return pipe


def write_adapter(path, kind: str = "sd15", seed: int = 0, rank: int = 2, bump: float = 0.5):
    """Export ``adapted_pipeline(...)`` with riemann_diffusion.export.save_adapter; returns (path, pipe)."""
    from riemann_diffusion.export import save_adapter

    pipe = adapted_pipeline(kind, seed, rank, bump)
    save_adapter(pipe, path)
    return path, pipe


def as_array(image) -> np.ndarray:
    """PIL image or file path -> float32 HxWx3 array in 0..255."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.open(image)
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(demo):
    """Queue and launch ``demo`` on 127.0.0.1 (free port) in this process; always close it."""
    from app.layout import launch

    _, url, _ = launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()
