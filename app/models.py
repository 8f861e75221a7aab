"""Which base model the demo runs, and a cache so it is loaded once.

A model name is one of:

- ``"tiny"`` (the default) or ``"tiny-<kind>"`` for kind in sd15/sdxl/sd3/flux: the
  embedded random-weight pipelines of :mod:`riemann_diffusion.tiny`, fully offline;
- a local folder written by ``save_pretrained``, loaded with ``local_files_only=True``;
- a hub id ``owner/name``: downloaded by diffusers, and only because a user typed it.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .inputs import DemoInputError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "TINY_MODELS", "LoadedPipeline", "PipelineCache", "resolve_model", "load_pipeline"]

DEFAULT_MODEL = "tiny"
#: demo name -> riemann_diffusion.tiny kind
TINY_MODELS = {"tiny": "sd15", "tiny-sd15": "sd15", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


@dataclass
class LoadedPipeline:
    """A pipeline plus what the demo did to it (which adapter file is loaded)."""

    model: str
    pipe: object
    is_tiny: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapter_key: tuple | None = None  # (resolved path, size, mtime) of the loaded adapter file
    adapter_name: str | None = None
    adapters_loaded: int = 0

    def default_resolution(self) -> int:
        """Square side in pixels the model was made for (64 for the tiny pipelines)."""
        if self.is_tiny:
            return 64
        pipe = self.pipe
        vsf = getattr(pipe, "vae_scale_factor", 8)
        unet = getattr(pipe, "unet", None)
        size = unet.config.sample_size if unet is not None else getattr(pipe, "default_sample_size", None)
        if isinstance(size, (tuple, list)):
            size = size[0]
        return int(size * vsf) if size else 1024


def resolve_model(model: str | None) -> tuple[str, str]:
    """``(kind, normalized name)`` where kind is "tiny", "local" or "hub"."""
    name = (model or "").strip() or DEFAULT_MODEL
    if name in TINY_MODELS:
        return "tiny", name
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise DemoInputError(f"Model folder '{name}' has no model_index.json; pick a folder written by "
                                 "diffusers' save_pretrained, a hub id like 'owner/name', or 'tiny'.")
        return "local", str(path.resolve())
    if _HUB_ID.fullmatch(name) and not name.startswith((".", "/")):
        return "hub", name
    raise DemoInputError(f"Model '{name}' is neither a built-in ({', '.join(TINY_MODELS)}), an existing folder, "
                         "nor a hub id like 'owner/name'.")


def _device_dtype(is_tiny: bool) -> tuple[str, torch.dtype]:
    if torch.cuda.is_available() and not is_tiny:
        return "cuda", torch.float16
    return "cpu", torch.float32


def load_pipeline(model: str | None) -> LoadedPipeline:
    """Build or load the pipeline named by ``model`` (see the module docstring)."""
    kind, name = resolve_model(model)
    if kind == "tiny":
        from riemann_diffusion.tiny import make_tiny_pipeline

        pipe = make_tiny_pipeline(TINY_MODELS[name])
        return LoadedPipeline(name, pipe, is_tiny=True)
    from diffusers import DiffusionPipeline

    device, dtype = _device_dtype(False)
    logger.info("loading %s pipeline %s on %s", kind, name, device)
    try:
        pipe = DiffusionPipeline.from_pretrained(name, torch_dtype=dtype, local_files_only=(kind == "local"),
                                                 use_safetensors=True)
    except Exception as exc:  # diffusers raises many types (OSError, ValueError, EnvironmentError, ...)
        raise DemoInputError(f"Could not load model '{name}': {type(exc).__name__}: {exc}") from exc
    pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(name, pipe, is_tiny=False)


class PipelineCache:
    """Keeps the last ``capacity`` loaded pipelines; loading is serialized by a lock."""

    def __init__(self, capacity: int = 1, loader=load_pipeline):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1; got {capacity}")
        self.capacity = capacity
        self._loader = loader
        self._items: dict[str, LoadedPipeline] = {}
        self._lock = threading.Lock()
        self.loads = 0  # how many times the loader ran (tests check the cache with it)

    def get(self, model: str | None) -> LoadedPipeline:
        _, name = resolve_model(model)
        with self._lock:
            if name in self._items:
                self._items[name] = self._items.pop(name)  # most recently used last
                return self._items[name]
            loaded = self._loader(name)
            self.loads += 1
            self._items[name] = loaded
            while len(self._items) > self.capacity:
                evicted = next(iter(self._items))
                logger.info("dropping cached pipeline %s", evicted)
                del self._items[evicted]
            return loaded

    def drop(self, model: str) -> None:
        """Forget a pipeline (after a failed adapter load left it in an unknown state)."""
        with self._lock:
            self._items.pop(model, None)

    def __contains__(self, model: str) -> bool:
        return model in self._items
