"""Synthetic subject photos for the offline default training run.

``make_example_images`` draws one toy (a round orange robot with a teal visor and a
yellow antenna) on varied backgrounds (wall and floor, grass, wooden table, studio
gradient), with small shifts, rotations and scale changes, as a DreamBooth-style
instance set. Drawing uses PIL only and a ``random.Random`` seeded per image, so the
files are byte-identical for the same arguments.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

EXAMPLE_PROMPT = "a photo of sks toy"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_SUPERSAMPLE = 4  # draw at 4x, then downsample with LANCZOS for smooth edges


def _lerp(c0, c1, t: float) -> tuple[int, int, int]:
    return tuple(round(a + (b - a) * t) for a, b in zip(c0, c1))


def _vertical_gradient(draw: ImageDraw.ImageDraw, box, top, bottom) -> None:
    x0, y0, x1, y1 = box
    for y in range(y0, y1):
        draw.line([(x0, y), (x1, y)], fill=_lerp(top, bottom, (y - y0) / max(1, y1 - y0 - 1)))


def _wall_and_floor(draw, s, rng):
    horizon = int(s * rng.uniform(0.55, 0.7))
    wall = rng.choice([(196, 214, 232), (232, 220, 200), (214, 200, 230)])
    _vertical_gradient(draw, (0, 0, s, horizon), wall, _lerp(wall, (255, 255, 255), 0.4))
    _vertical_gradient(draw, (0, horizon, s, s), (150, 120, 96), (110, 84, 64))


def _grass(draw, s, rng):
    horizon = int(s * rng.uniform(0.4, 0.55))
    _vertical_gradient(draw, (0, 0, s, horizon), (120, 180, 235), (200, 230, 250))
    _vertical_gradient(draw, (0, horizon, s, s), (96, 168, 72), (52, 112, 40))
    for _ in range(60):
        x, y = rng.uniform(0, s), rng.uniform(horizon, s)
        draw.line([(x, y), (x + rng.uniform(-s, s) * 0.01, y - s * 0.03)], fill=(40, 96, 32), width=max(1, s // 128))


def _wooden_table(draw, s, rng):
    _vertical_gradient(draw, (0, 0, s, s), (176, 124, 80), (128, 84, 52))
    for _ in range(14):
        y = rng.uniform(0, s)
        draw.line([(0, y), (s, y + rng.uniform(-s, s) * 0.05)], fill=(112, 72, 44), width=max(1, s // 96))


def _studio(draw, s, rng):
    top = rng.choice([(240, 240, 240), (60, 64, 80), (250, 228, 228)])
    _vertical_gradient(draw, (0, 0, s, s), top, _lerp(top, (128, 128, 128), 0.5))


_BACKGROUNDS = (_wall_and_floor, _grass, _wooden_table, _studio)


def _draw_toy(s: int) -> Image.Image:
    """The subject on a transparent s x s layer, centred, about 60% of the height."""
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    u = s / 100  # drawing unit
    body, dark = (236, 112, 36, 255), (168, 70, 20, 255)
    d.ellipse([30 * u, 78 * u, 70 * u, 86 * u], fill=(0, 0, 0, 70))  # shadow
    d.rounded_rectangle([32 * u, 50 * u, 68 * u, 80 * u], radius=8 * u, fill=body, outline=dark, width=round(u))
    d.ellipse([44 * u, 58 * u, 56 * u, 70 * u], fill=(250, 204, 40, 255))  # chest button
    d.ellipse([30 * u, 22 * u, 70 * u, 54 * u], fill=body, outline=dark, width=round(u))  # head
    d.rounded_rectangle([36 * u, 31 * u, 64 * u, 43 * u], radius=5 * u, fill=(32, 160, 168, 255))  # visor
    for cx in (44, 56):
        d.ellipse([(cx - 3) * u, 34 * u, (cx + 3) * u, 40 * u], fill=(255, 255, 255, 255))
    d.line([50 * u, 22 * u, 50 * u, 13 * u], fill=dark, width=round(2 * u))  # antenna
    d.ellipse([46 * u, 9 * u, 54 * u, 17 * u], fill=(250, 204, 40, 255))
    return layer


def _example_image(size: int, rng: random.Random) -> Image.Image:
    s = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (s, s))
    rng.choice(_BACKGROUNDS)(ImageDraw.Draw(canvas), s, rng)
    toy = _draw_toy(s).rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, center=(s / 2, s * 0.8))
    scale = rng.uniform(0.8, 1.05)
    toy = toy.resize((round(s * scale),) * 2, Image.BICUBIC)
    offset = (round((s - toy.width) / 2 + rng.uniform(-0.12, 0.12) * s),
              round((s - toy.height) / 2 + rng.uniform(-0.06, 0.1) * s))
    canvas.paste(toy, offset, toy)
    return canvas.resize((size, size), Image.LANCZOS)


def make_example_images(out_dir, n: int = 4, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``n`` synthetic ``size`` x ``size`` RGB PNGs of the toy to ``out_dir``.

    Files are ``subject_00.png``, ``subject_01.png``, ...; a few KB each at 64 px.
    Image ``i`` depends only on ``(seed, i, size)``. Returns the paths in order.
    """
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = _example_image(size, random.Random(seed * 1_000_003 + i))
        path = out_dir / f"subject_{i:02d}.png"
        image.save(path, format="PNG", optimize=True)
        paths.append(path)
    return paths


def list_images(directory) -> list[Path]:
    """Image files (by suffix) directly inside ``directory``, sorted; [] if it does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def ensure_example_images(directory, n: int = 4, size: int = 64, seed: int = 0) -> list[Path]:
    """Return the images in ``directory``; if it holds none, create them with ``make_example_images``."""
    return list_images(directory) or make_example_images(directory, n=n, size=size, seed=seed)
