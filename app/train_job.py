"""Run ``riemann_diffusion.training.train`` in a background thread the UI can watch and cancel.

The training module's contract: ``train(config, callback=fn) -> TrainResult`` where
``fn(step, total, loss, lr)`` may return False to stop. :class:`TrainJob` records every
callback in ``history`` (what the live loss plot shows) and returns False once
:meth:`TrainJob.cancel` was called. The UI's defaults are ``TrainConfig()``'s
(:func:`train_defaults`), and :func:`build_train_config` applies the demo's fields
with the config module's own short keys.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["TrainPoint", "TrainJob", "training_available", "build_train_config", "train_defaults", "result_paths"]

#: shown when the training module is not installed, so the UI still has sensible numbers
FALLBACK_DEFAULTS = {"instance_prompt": "a photo of sks toy", "rank": 4, "max_steps": 200, "lr": 0.1}


def training_available() -> bool:
    try:
        from riemann_diffusion.training import TrainConfig, train  # noqa: F401
    except ImportError:
        return False
    return True


def train_defaults() -> dict:
    """UI defaults ``{"instance_prompt", "rank", "max_steps", "lr"}`` read from ``TrainConfig()``."""
    try:
        from riemann_diffusion.training import TrainConfig
    except ImportError:
        return dict(FALLBACK_DEFAULTS)
    from riemann_diffusion.examples_data import EXAMPLE_PROMPT

    cfg = TrainConfig()
    return {"instance_prompt": cfg.data.instance_prompt or EXAMPLE_PROMPT, "rank": cfg.adapter.rank,
            "max_steps": cfg.run.max_steps, "lr": cfg.lr}


def build_train_config(overrides: dict):
    """``TrainConfig()`` with ``overrides`` (short keys such as ``lr``, ``max_steps``) applied and validated.

    Raises the training module's ``ConfigError`` (a ValueError) on unknown keys or bad values.
    """
    from riemann_diffusion.training import TrainConfig
    from riemann_diffusion.training.config import apply_overrides

    cfg = apply_overrides(TrainConfig(), {k: v for k, v in overrides.items() if v is not None})
    return cfg.validate()


def result_paths(result) -> dict:
    """``{"adapter", "loss_plot", "log", "images"}`` of a ``TrainResult`` (None / [] where absent)."""

    def existing(value):
        return str(value) if value and Path(value).is_file() else None

    images = [existing(getattr(result, "grid_path", None))]
    return {"adapter": existing(getattr(result, "adapter_path", None)),
            "loss_plot": existing(getattr(result, "loss_plot_path", None)),
            "log": existing(getattr(result, "log_path", None)),
            "images": [p for p in images if p]}


@dataclass
class TrainPoint:
    step: int
    total: int
    loss: float
    lr: float


@dataclass
class TrainJob:
    """One training run in a daemon thread; ``state`` is running/done/cancelled/failed."""

    config: object
    train_fn: object = None
    history: list[TrainPoint] = field(default_factory=list)
    state: str = "created"
    result: object = None
    error: str | None = None
    started: float = 0.0
    finished: float = 0.0
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> TrainJob:
        if self.train_fn is None:
            from riemann_diffusion.training import train

            self.train_fn = train
        self.state, self.started = "running", time.monotonic()
        self._thread = threading.Thread(target=self._run, name="demo-train", daemon=True)
        self._thread.start()
        return self

    def _callback(self, step, total, loss, lr):
        self.history.append(TrainPoint(int(step), int(total), float(loss), float(lr)))
        return not self._cancel.is_set()

    def _run(self):
        try:
            self.result = self.train_fn(self.config, callback=self._callback)
            cancelled = self._cancel.is_set() or getattr(self.result, "cancelled", False)
            self.state = "cancelled" if cancelled else "done"
        except Exception as exc:  # shown in the UI; the server keeps running
            logger.exception("training failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "cancelled" if self._cancel.is_set() else "failed"
        finally:
            self.finished = time.monotonic()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds; True when the run has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    @property
    def progress(self) -> tuple[int, int]:
        return (self.history[-1].step, self.history[-1].total) if self.history else (0, 0)
