"""Instance/class images: load, check, convert, transform; deterministic sample order.

Every random choice of training (which image, crop, flip, noise, timestep) comes
from :func:`sample_generator`, a fresh ``torch.Generator`` seeded by
``(seed, step, slot, stream)``. Nothing depends on RNG state carried between
steps, so a resumed run and a run split over several processes draw exactly the
same numbers as one uninterrupted single-process run.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..examples_data import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

__all__ = ["DataError", "TrainImage", "load_image_folder", "to_rgb", "transform_image", "sample_generator",
           "dataset_index", "ensure_class_images", "MAX_PIXELS"]

#: images above this many pixels are decoded reduced (JPEG draft) and downscaled on load.
MAX_PIXELS = 64_000_000


class DataError(ValueError):
    """Training images are missing or unusable; the message says which and why."""


@dataclass
class TrainImage:
    path: Path
    image: Image.Image  # RGB, 8 bit, short side <= 2 x resolution


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to 8-bit RGB; returns (image, note) where note says what was converted.

    Alpha is composited on white; 16/32-bit and float images are rescaled to 0..255
    (not clipped); CMYK, palette and greyscale go through PIL's conversions.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F" and arr.max() <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB"), f"{mode} (high bit depth) rescaled to 8-bit RGB"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode} with alpha composited on white"
    return image.convert("RGB"), f"{mode} converted to RGB"


def _open(path: Path, resolution: int) -> tuple[Image.Image, list[str]]:
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                notes.append(f"huge ({img.width}x{img.height}) downscaled")
                img.draft("RGB", (resolution * 2, resolution * 2))  # JPEG: decode reduced
            img.load()
            image = ImageOps.exif_transpose(img)
    image, note = to_rgb(image)
    if note:
        notes.append(note)
    short = min(image.size)
    if short > 2 * resolution:  # keep memory small; the transform resizes to `resolution` anyway
        scale = 2 * resolution / short
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    elif short < resolution:
        notes.append(f"small ({image.width}x{image.height}) upscaled to {resolution}")
    if min(image.size) < 1:
        raise ValueError("image has zero size")
    return image, notes


def load_image_folder(directory, resolution: int, what: str = "instance") -> list[TrainImage]:
    """All usable images directly in ``directory``, converted to RGB.

    Raises DataError when the folder is missing, empty, or has no usable image;
    non-image and corrupt files are skipped with a warning when others are fine.
    """
    directory = Path(directory).expanduser()
    if not directory.exists():
        raise DataError(f"{what} image folder {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise DataError(f"{what} image folder {str(directory)!r} is not a folder")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{what} image folder {str(directory)!r} is empty; put {', '.join(IMAGE_SUFFIXES)} files in it")
    images, skipped = [], []
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(f"{path.name}: not an image file (suffix {path.suffix or 'none'})")
            continue
        try:
            image, notes = _open(path, resolution)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:
            skipped.append(f"{path.name}: cannot be read ({type(exc).__name__}: {exc})")
            continue
        for note in notes:
            logger.warning("%s image %s: %s", what, path.name, note)
        images.append(TrainImage(path, image))
    for reason in skipped:
        logger.warning("skipping %s file %s", what, reason)
    if not images:
        raise DataError(f"no usable {what} image in {str(directory)!r}: " + "; ".join(skipped))
    logger.info("%d %s images from %s (%d skipped)", len(images), what, directory, len(skipped))
    return images


def transform_image(image: Image.Image, resolution: int, center_crop: bool, flip: bool,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Resize (short side = resolution), crop square, optionally flip; (3, res, res) in [-1, 1]."""
    w, h = image.size
    scale = resolution / min(w, h)
    new = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.BICUBIC if scale > 1 else Image.LANCZOS)
    w, h = image.size
    if center_crop or generator is None:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


def sample_generator(seed: int, step: int, slot: int, stream: str) -> torch.Generator:
    """A CPU generator determined by (seed, step, slot, stream) only."""
    digest = hashlib.blake2b(f"{seed}/{step}/{slot}/{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def dataset_index(seed: int, global_position: int, n: int, stream: str) -> int:
    """Image index of the ``global_position``-th sample: a fresh permutation of n per epoch."""
    epoch, pos = divmod(global_position, n)
    perm = torch.randperm(n, generator=sample_generator(seed, epoch, 0, f"order/{stream}"))
    return int(perm[pos])


def ensure_class_images(pipe, directory, prompt: str, count: int, steps: int, seed: int, call_kwargs: dict) -> int:
    """Generate class images with ``pipe`` until ``directory`` holds ``count``; returns how many were made.

    ``call_kwargs`` go to the pipeline call (``height``, ``width``, ...); image i uses seed ``seed + i``.
    """
    from ..examples_data import list_images

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    have = len(list_images(directory))
    missing = max(0, count - have)
    for i in range(missing):
        index = have + i
        gen = torch.Generator().manual_seed(seed + index)
        image = pipe(prompt, num_inference_steps=steps, generator=gen, **call_kwargs).images[0]
        tmp = directory / f".class_{index:05d}.png.tmp"
        image.save(tmp, format="PNG")
        tmp.replace(directory / f"class_{index:05d}.png")
    if missing:
        logger.info("generated %d class images in %s", missing, directory)
    return missing
