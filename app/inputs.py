"""Checks on what a demo user typed or uploaded, with messages a person can act on.

Every check raises :class:`DemoInputError` (a ``ValueError``) saying what was received
and what is expected; the layout turns it into a ``gr.Error`` pop-up. Nothing here
imports gradio.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = [
    "DemoInputError",
    "MAX_STEPS",
    "MAX_RESOLUTION",
    "MAX_TRAIN_STEPS",
    "MAX_TRAIN_IMAGES",
    "check_prompt",
    "check_steps",
    "check_resolution",
    "check_guidance",
    "check_strength",
    "check_seed",
    "check_rank",
    "check_lr",
    "collect_images",
    "clear_dir",
]

#: Upper bounds: beyond these a CPU demo would hang for hours (or run out of memory).
MAX_STEPS = 200
MAX_RESOLUTION = 2048
MAX_TRAIN_STEPS = 20_000
MAX_TRAIN_IMAGES = 100
MAX_PROMPT_CHARS = 2_000


class DemoInputError(ValueError):
    """A user input the demo cannot use; the message is shown in the UI as is."""


def _number(value, name: str, kind=float):
    if value is None or value == "":
        raise DemoInputError(f"{name} is empty; enter a number.")
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number; got {value!r}.") from None
    if kind is int and float(value) != out:
        raise DemoInputError(f"{name} must be a whole number; got {value!r}.")
    if out != out or out in (float("inf"), float("-inf")):
        raise DemoInputError(f"{name} must be a finite number; got {value!r}.")
    return out


def check_prompt(prompt, name: str = "Prompt", required: bool = True) -> str:
    """Stripped prompt text; empty is an error when ``required``."""
    text = "" if prompt is None else str(prompt).strip()
    if required and not text:
        raise DemoInputError(f"{name} is empty; describe the image you want, e.g. 'a photo of sks toy'.")
    if len(text) > MAX_PROMPT_CHARS:
        raise DemoInputError(f"{name} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted.")
    return text


def check_steps(steps, name: str = "Steps", maximum: int = MAX_STEPS) -> int:
    n = _number(steps, name, int)
    if not 1 <= n <= maximum:
        raise DemoInputError(f"{name} must be between 1 and {maximum}; got {n}.")
    return n


def check_resolution(value, name: str = "Resolution") -> int:
    """0 (the model's default) or a multiple of 8 in [64, MAX_RESOLUTION]."""
    n = _number(value, name, int)
    if n == 0:
        return 0
    if not 64 <= n <= MAX_RESOLUTION or n % 8:
        raise DemoInputError(
            f"{name} must be 0 (model default) or a multiple of 8 between 64 and {MAX_RESOLUTION}; got {n}.")
    return n


def check_guidance(value) -> float:
    g = _number(value, "Guidance")
    if not 0.0 <= g <= 30.0:
        raise DemoInputError(f"Guidance must be between 0 and 30; got {g}.")
    return g


def check_strength(value) -> float:
    s = _number(value, "Adapter strength")
    if not -2.0 <= s <= 2.0:
        raise DemoInputError(f"Adapter strength must be between -2 and 2; got {s}.")
    return s


def check_seed(value) -> int:
    s = _number(value, "Seed", int)
    if not 0 <= s < 2**63:
        raise DemoInputError(f"Seed must be a whole number between 0 and 2^63-1; got {s}.")
    return s


def check_rank(value) -> int:
    r = _number(value, "Rank", int)
    if not 1 <= r <= 256:
        raise DemoInputError(f"Rank must be between 1 and 256; got {r}.")
    return r


def check_lr(value) -> float:
    lr = _number(value, "Learning rate")
    if not 0.0 < lr <= 1.0:
        raise DemoInputError(f"Learning rate must be in (0, 1]; got {lr}.")
    return lr


def _paths(files) -> list[Path]:
    if files is None:
        return []
    if isinstance(files, (str, Path)):
        files = [files]
    out = []
    for f in files:
        # gradio gives str paths; tolerate dict-like {"path": ...} and objects with .name
        path = f.get("path") if isinstance(f, dict) else getattr(f, "name", f)
        if path:
            out.append(Path(path))
    return out


def collect_images(files: Iterable | None, dest) -> list[Path]:
    """Verify uploaded images and copy them, converted to RGB PNG, into ``dest``.

    Raises DemoInputError when there is none, too many, or one that is not an image
    (naming the file). Returns the written paths in upload order.
    """
    paths = _paths(files)
    if not paths:
        raise DemoInputError("No training images: upload a few photos (PNG, JPEG or WebP) of your subject.")
    if len(paths) > MAX_TRAIN_IMAGES:
        raise DemoInputError(f"{len(paths)} images uploaded; at most {MAX_TRAIN_IMAGES} are accepted.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im.verify()  # cheap structural check; reopen to decode
            with Image.open(path) as im:
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DemoInputError(f"'{path.name}' is not an image the demo can read ({type(exc).__name__}); "
                                 "upload PNG, JPEG or WebP files.") from None
        if min(rgb.size) < 8:
            raise DemoInputError(f"'{path.name}' is {rgb.size[0]}x{rgb.size[1]} pixels; images need at least 8x8.")
        out = dest / f"image_{i:03d}.png"
        rgb.save(out, format="PNG")
        written.append(out)
    return written


def clear_dir(path) -> None:
    """Remove a scratch folder the demo made (ignore it if already gone)."""
    shutil.rmtree(path, ignore_errors=True)
