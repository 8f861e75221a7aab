"""Everything the demo does, without gradio: generate, inspect, train.

:class:`DemoBackend` owns the pipeline cache, the adapters folder and a scratch
folder. Its methods take the plain values a form holds and return images, dicts and
paths; bad input raises :class:`~app.inputs.DemoInputError` with a message for the
person at the keyboard. ``app.layout`` wires these methods to widgets.

Generation applies an adapter file with diffusers' own loader
(``pipe.load_lora_weights`` then ``pipe.set_adapters([name], [strength])``), so a
strength s gives the base weights plus s·ΔW; the base image is drawn with the LoRA
layers disabled and the same seed.
"""

from __future__ import annotations

import inspect as _inspect
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import inputs
from .adapter_info import AdapterReport, inspect_adapter, read_lora, singular_value_plot
from .inputs import DemoInputError
from .models import DEFAULT_MODEL, LoadedPipeline, PipelineCache
from .train_job import TrainJob, build_train_config, result_paths, train_defaults, training_available

logger = logging.getLogger(__name__)

__all__ = ["DemoBackend", "GenerateResult", "DemoInputError", "AdapterReport", "TrainJob", "NO_ADAPTER",
           "inspect_adapter", "singular_value_plot", "train_defaults", "training_available"]

NO_ADAPTER = "(none)"
MAX_JOBS = 16  # finished training jobs remembered for cancel/status
GENERATE_DEFAULTS = {"steps": 25, "guidance": 7.5, "seed": 0, "strength": 1.0, "resolution": 0}


@dataclass
class GenerateResult:
    base: Image.Image
    adapted: Image.Image | None
    info: str
    seconds: float


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:limit] or "adapter"


def _atomic_copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


class DemoBackend:
    """State shared by all users of one demo server.

    Args:
        adapters_dir: folder whose ``*.safetensors`` files (and those one level down)
            the Generate and Inspect tabs offer; trained adapters are copied here.
        work_dir: scratch space for uploads and training runs (a temp dir if None).
        model: the model preselected in the UI (``"tiny"``: offline embedded default).
        cache: a :class:`PipelineCache` (one pipeline kept by default).
        train_overrides: extra ``TrainConfig`` keys for every run from the demo
            (e.g. ``{"validation_steps": 2}``); the form's fields win over them.
    """

    def __init__(self, adapters_dir="adapters", work_dir=None, model: str = DEFAULT_MODEL,
                 cache: PipelineCache | None = None, train_overrides: dict | None = None):
        self.adapters_dir = Path(adapters_dir).expanduser().resolve()
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="riemann-demo-")).resolve()
        self.model = model
        self.cache = cache or PipelineCache()
        self.train_overrides = dict(train_overrides or {})
        self.jobs: dict[str, TrainJob] = {}
        self._jobs_lock = threading.Lock()

    # ------------------------------------------------------------------ adapters
    def list_adapters(self) -> list[str]:
        """Adapter files under ``adapters_dir`` (depth ≤ 2) as relative paths, newest first."""
        if not self.adapters_dir.is_dir():
            return []
        files = [p for pattern in ("*.safetensors", "*/*.safetensors") for p in self.adapters_dir.glob(pattern)]
        files = [p for p in files if p.is_file() and not p.name.startswith(".")]
        files.sort(key=lambda p: (-p.stat().st_mtime, str(p)))
        return [p.relative_to(self.adapters_dir).as_posix() for p in files]

    def resolve_adapter(self, choice: str | None = None, upload=None) -> Path | None:
        """The adapter file to use: an upload wins over a folder choice; None for no adapter."""
        if upload:
            path = Path(upload.get("path") if isinstance(upload, dict) else upload)
            if not path.is_file():
                raise DemoInputError(f"Uploaded adapter '{path.name}' is missing on the server; upload it again.")
            return path
        if not choice or choice == NO_ADAPTER:
            return None
        path = (self.adapters_dir / choice).resolve()
        if self.adapters_dir not in path.parents or path.suffix != ".safetensors" or not path.is_file():
            raise DemoInputError(f"Adapter '{choice}' is not a .safetensors file in {self.adapters_dir.name}/; "
                                 f"available: {', '.join(self.list_adapters()) or 'none'}.")
        return path

    # ------------------------------------------------------------------ generate
    def _apply_adapter(self, loaded: LoadedPipeline, path: Path, strength: float) -> None:
        pipe = loaded.pipe
        if not hasattr(pipe, "load_lora_weights"):
            raise DemoInputError(f"The pipeline {type(pipe).__name__} of '{loaded.model}' cannot load LoRA adapters.")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if loaded.adapter_key != key:
            if loaded.adapter_name is not None:  # PEFT-wrapped layers are no nn.Linear: unload before checking
                pipe.unload_lora_weights()
                loaded.adapter_key = loaded.adapter_name = None
            self._check_fits(loaded, path)
            name = f"demo_{loaded.adapters_loaded}"
            loaded.adapters_loaded += 1
            try:
                pipe.load_lora_weights(str(path), adapter_name=name)
                active = {a for names in pipe.get_list_adapters().values() for a in names}
                if name not in active:
                    raise ValueError("none of its layers match a module of this model")
            except Exception as exc:  # diffusers/peft raise ValueError, KeyError, RuntimeError ...
                self._reset_lora(loaded)
                raise DemoInputError(f"Adapter '{path.name}' does not fit model '{loaded.model}': "
                                     f"{type(exc).__name__}: {str(exc)[:400]}") from None
            loaded.adapter_key, loaded.adapter_name = key, name
        pipe.enable_lora()
        pipe.set_adapters([loaded.adapter_name], adapter_weights=[strength])

    @staticmethod
    def _check_fits(loaded: LoadedPipeline, path: Path) -> None:
        """Readable errors for corrupt files and adapters made for another architecture."""
        from riemann_diffusion.export import LoraFileError, check_lora_matches

        lora = read_lora(path)
        for component in ("unet", "transformer"):
            model = getattr(loaded.pipe, component, None)
            if model is not None and component in lora.components:
                try:
                    check_lora_matches(lora, model, component)
                except LoraFileError as exc:
                    message = str(exc).replace(str(path), f"'{path.name}'")
                    raise DemoInputError(f"Adapter does not fit model '{loaded.model}': {message}") from None

    def _reset_lora(self, loaded: LoadedPipeline) -> None:
        try:
            loaded.pipe.unload_lora_weights()
        except Exception:  # a half-loaded adapter: rebuild the pipeline next time
            logger.exception("could not unload LoRA weights; dropping the cached pipeline")
            self.cache.drop(loaded.model)
        loaded.adapter_key = loaded.adapter_name = None

    @staticmethod
    def _call(loaded: LoadedPipeline, prompt, negative, steps, guidance, seed, size) -> Image.Image:
        pipe = loaded.pipe
        accepted = _inspect.signature(pipe.__call__).parameters
        kwargs = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
        if negative and "negative_prompt" in accepted:
            kwargs["negative_prompt"] = negative
        if loaded.is_tiny and "max_sequence_length" in accepted:
            kwargs["max_sequence_length"] = 16
        with torch.inference_mode():
            return pipe(**{k: v for k, v in kwargs.items() if k in accepted}).images[0]

    def generate(self, model=None, prompt="", negative_prompt="", steps=GENERATE_DEFAULTS["steps"],
                 guidance=GENERATE_DEFAULTS["guidance"], seed=0, strength=1.0, resolution=0,
                 adapter: str | None = None, adapter_upload=None) -> GenerateResult:
        """Base image and adapted image (None without an adapter), both from ``seed``."""
        prompt = inputs.check_prompt(prompt)
        negative = inputs.check_prompt(negative_prompt, "Negative prompt", required=False)
        steps, guidance = inputs.check_steps(steps), inputs.check_guidance(guidance)
        seed, strength = inputs.check_seed(seed), inputs.check_strength(strength)
        resolution = inputs.check_resolution(resolution)
        path = self.resolve_adapter(adapter, adapter_upload)
        loaded = self.cache.get(model or self.model)
        size = resolution or loaded.default_resolution()
        t0 = time.perf_counter()
        with loaded.lock:
            if path is not None:
                self._apply_adapter(loaded, path, strength)
            if loaded.adapter_name is not None:
                loaded.pipe.disable_lora()
            base = self._call(loaded, prompt, negative, steps, guidance, seed, size)
            adapted = None
            if path is not None:
                loaded.pipe.enable_lora()
                adapted = self._call(loaded, prompt, negative, steps, guidance, seed, size)
        seconds = time.perf_counter() - t0
        info = f"**{loaded.model}** · seed {seed} · {steps} steps · guidance {guidance:g} · {size}×{size}"
        if adapted is not None:
            diff = np.abs(np.asarray(adapted, np.float32) - np.asarray(base, np.float32)).mean()
            info += f" · adapter `{path.name}` at strength {strength:g} · mean |adapted − base| = {diff:.1f}/255"
        else:
            info += " · no adapter chosen: only the base image"
        return GenerateResult(base, adapted, info + f" · {seconds:.1f} s", seconds)

    # ------------------------------------------------------------------ inspect
    def inspect(self, adapter: str | None = None, upload=None) -> tuple[AdapterReport, Image.Image]:
        """Report and singular-value plot of the chosen or uploaded adapter file."""
        path = self.resolve_adapter(adapter, upload)
        if path is None:
            raise DemoInputError("Choose an adapter from the folder or upload a .safetensors file to inspect.")
        report = inspect_adapter(path)
        return report, singular_value_plot(report)

    # ------------------------------------------------------------------ train
    def start_training(self, images, prompt, rank, steps, lr, model=None, resolution=None,
                       extra: dict | None = None, train_fn=None) -> tuple[str, TrainJob]:
        """Validate the form, copy the images, and start a :class:`TrainJob`; returns (job id, job)."""
        prompt = inputs.check_prompt(prompt, "Instance prompt")
        rank = inputs.check_rank(rank)
        steps = inputs.check_steps(steps, "Training steps", inputs.MAX_TRAIN_STEPS)
        lr = inputs.check_lr(lr)
        resolution = inputs.check_resolution(resolution or 0, "Training resolution") or None
        if train_fn is None and not training_available():
            raise DemoInputError("Training is not available in this installation (riemann_diffusion.training "
                                 "is missing).")
        job_id = uuid.uuid4().hex[:12]
        run_dir = self.work_dir / "runs" / job_id
        images = inputs.collect_images(images, run_dir / "instance_images")
        overrides = {"progress_bar": False, "adapter_name": _slug(prompt), **self.train_overrides,
                     "model": model or self.model, "instance_dir": str(images[0].parent),
                     "instance_prompt": prompt, "rank": rank, "max_steps": steps, "lr": lr,
                     "resolution": resolution, "output_dir": str(run_dir / "output"), **(extra or {})}
        try:
            config = build_train_config(overrides) if train_fn is None else overrides
        except ValueError as exc:
            raise DemoInputError(f"Training settings rejected: {exc}") from None
        job = TrainJob(config, train_fn=train_fn).start()
        with self._jobs_lock:
            self.jobs[job_id] = job
            finished = [k for k, j in self.jobs.items() if not j.running]
            for k in finished[: max(0, len(self.jobs) - MAX_JOBS)]:
                del self.jobs[k]  # forget old runs (their files stay in work_dir)
        return job_id, job

    def cancel_training(self, job_id: str | None) -> str:
        job = self.jobs.get(job_id or "")
        if job is None or not job.running:
            return "No training is running."
        job.cancel()
        return "Cancelling: training stops after the current step."

    def publish_adapter(self, job: TrainJob) -> Path | None:
        """Copy a finished job's adapter file into ``adapters_dir``; its new path (None if it has none)."""
        adapter = result_paths(job.result).get("adapter") if job.result is not None else None
        if not adapter or not Path(adapter).is_file():
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dst = self.adapters_dir / f"{Path(adapter).stem}-{stamp}.safetensors"
        return _atomic_copy(Path(adapter), dst)
