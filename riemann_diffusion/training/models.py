"""Load the base pipeline (tiny offline, local folder or hub id) and describe it for training."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..presets import detect_family
from .config import ConfigError
from .families import FAMILIES, Family

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_pipeline", "TINY_MODELS", "WEIGHT_DTYPES", "text_encoder_names"]

#: ``--model`` values built offline by riemann_diffusion.tiny (no download).
TINY_MODELS = {"tiny": "sd15", "tiny-sd15": "sd15", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class LoadedModel:
    """A pipeline plus what training needs to know about it."""

    pipe: object
    family: Family
    model_id: str  # provenance: hub id, "tiny-<kind>" or "local:<folder name>" (never a full path)
    is_tiny: bool
    prediction: str  # "epsilon" | "v_prediction" | "flow"
    native_resolution: int

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.family.denoiser_attr)


def _from_pretrained(model: str, cfg):
    from diffusers import DiffusionPipeline

    local = Path(model).expanduser()
    kwargs = dict(use_safetensors=True, revision=cfg.revision, variant=cfg.variant)
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ConfigError(f"model folder {str(local)!r} has no model_index.json; expected a diffusers "
                              f"pipeline folder (save_pretrained layout), a hub id or 'tiny'")
        return DiffusionPipeline.from_pretrained(local, local_files_only=True, **kwargs), f"local:{local.resolve().name}"
    if not _HUB_ID.match(model):
        raise ConfigError(f"model {model!r} is neither an existing folder nor a hub id like 'owner/name'; "
                          f"offline choices: {', '.join(TINY_MODELS)}")
    return DiffusionPipeline.from_pretrained(model, **kwargs), model


def _prediction(pipe, family: Family) -> str:
    if family.flow:
        return "flow"
    kind = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise ConfigError(f"scheduler prediction_type {kind!r} is not supported; expected epsilon or v_prediction")
    return kind


def _native_resolution(pipe, family: Family, is_tiny: bool) -> int:
    size = getattr(getattr(pipe, family.denoiser_attr).config, "sample_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if size and family.name != "flux":
        return int(size) * pipe.vae_scale_factor
    return 64 if is_tiny else 1024


def load_pipeline(cfg, device, weight_dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Build or load the pipeline of ``cfg`` (a BaseConfig) on ``device``.

    The denoiser and text encoders are cast to ``weight_dtype`` (the VAE stays fp32);
    every parameter is frozen. Adapters are injected later, so they stay fp32.
    """
    from ..tiny import make_tiny_pipeline

    model = (cfg.model or "tiny").strip()
    if model in TINY_MODELS:
        pipe, model_id, is_tiny = make_tiny_pipeline(TINY_MODELS[model], seed=0), f"tiny-{TINY_MODELS[model]}", True
    else:
        try:
            pipe, model_id = _from_pretrained(model, cfg)
        except ConfigError:
            raise
        except Exception as exc:  # diffusers/hub raise many types; say what we tried
            raise ConfigError(f"could not load pipeline {model!r}: {type(exc).__name__}: {exc}") from exc
        is_tiny = False
    try:
        name = detect_family(pipe)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if name not in FAMILIES:
        raise ConfigError(f"training supports {sorted(FAMILIES)} pipelines; {type(pipe).__name__} is {name!r}")
    family = FAMILIES[name]
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.requires_grad_(False)
            comp.to(device)
            if comp is not pipe.vae and weight_dtype != torch.float32:
                comp.to(weight_dtype)
    logger.info("loaded %s (%s, %s)", model_id, type(pipe).__name__, name)
    return LoadedModel(pipe, family, model_id, is_tiny, _prediction(pipe, family),
                       _native_resolution(pipe, family, is_tiny))


def text_encoder_names(pipe) -> list[str]:
    """Pipeline attributes holding CLIP text encoders (the ones text-encoder adapters go into)."""
    names = []
    for attr in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, attr, None)
        if enc is not None and type(enc).__name__.startswith("CLIPTextModel"):
            names.append(attr)
    return names
