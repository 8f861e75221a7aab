"""Tiny pipelines with a few Riemannion steps taken, for the export tests.

``trained(kind)`` returns a cached ``Trained``: the untouched base pipeline (deep-copy
it for a "fresh" pipeline), the trained pipeline with adapters in its denoiser and
CLIP text encoders, and the dense updates X − X0 of every adapter (the reference
every exported file must reproduce).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch

from riemann_diffusion import Riemannion, adapter_parameters, inject_adapters, iter_adapters
from riemann_diffusion.tiny import make_tiny_pipeline

KINDS = ("sd15", "sdxl", "sd3", "flux")
PROMPT = "a photo of sks dog"


def denoiser(pipe):
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def denoiser_name(pipe) -> str:
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def clip_encoders(pipe) -> dict:
    """{component: CLIP text encoder} of a pipeline (T5 encoders are left out)."""
    out = {}
    for attr in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, attr, None)
        if te is not None and type(te).__name__.startswith("CLIPTextModel"):
            out[attr] = te
    return out


def _g(seed):
    return torch.Generator().manual_seed(seed)


def denoiser_loss(kind: str, model) -> torch.Tensor:
    """A loss through the denoiser on fixed random inputs (grows the output)."""
    if kind in ("sd15", "sdxl"):
        cfg = model.config
        x = torch.randn(1, 4, 8, 8, generator=_g(1))
        ehs = torch.randn(1, 5, cfg.cross_attention_dim, generator=_g(2))
        extra = {}
        if kind == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=_g(3)),
                                          "time_ids": torch.randn(1, 6, generator=_g(4))}
        out = model(x, 10, ehs, **extra).sample
    elif kind == "sd3":
        out = model(hidden_states=torch.randn(1, 4, 8, 8, generator=_g(1)),
                    encoder_hidden_states=torch.randn(1, 5, 64, generator=_g(2)),
                    pooled_projections=torch.randn(1, 64, generator=_g(3)), timestep=torch.tensor([10.0])).sample
    else:
        out = model(hidden_states=torch.randn(1, 16, 16, generator=_g(1)),
                    encoder_hidden_states=torch.randn(1, 5, 32, generator=_g(2)),
                    pooled_projections=torch.randn(1, 32, generator=_g(3)), timestep=torch.tensor([0.5]),
                    img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3)).sample
    return -out.pow(2).mean()


def token_ids(pipe):
    return pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids


def te_outputs(pipe) -> dict:
    ids = token_ids(pipe)
    with torch.no_grad():
        return {name: te(ids)[0].clone() for name, te in clip_encoders(pipe).items()}


def run_pipeline(pipe, kind: str, steps: int = 2) -> torch.Tensor:
    """Latents of a short, seeded, guidance-free run (CFG would amplify rounding 7×)."""
    kw = dict(num_inference_steps=steps, output_type="latent", height=64, width=64, guidance_scale=1.0)
    if kind in ("sd3", "flux"):
        kw["max_sequence_length"] = 16
    with torch.no_grad():
        return pipe(PROMPT, generator=_g(0), **kw).images.clone()


@dataclass
class Trained:
    kind: str
    base: object  # untouched pipeline: copy.deepcopy(...) it before use
    pipe: object  # pipeline with trained adapters
    deltas: dict  # {"component.module path in the model": dense X − X0}
    base_output: torch.Tensor
    output: torch.Tensor


def train(pipe, kind: str, steps: int = 2, rank: int = 2, lr: float = 4.0, text_encoders: bool = True):
    """Inject adapters (auto preset, 'clip' for CLIP encoders) and take ``steps`` Riemannion steps."""
    den = denoiser(pipe)
    inject_adapters(den, "auto", rank=rank, init_scale=0.05, seed=0)
    params = adapter_parameters(den)
    tes = clip_encoders(pipe) if text_encoders else {}
    for te in tes.values():
        inject_adapters(te, "clip", rank=rank, init_scale=0.05, seed=1)
        params += adapter_parameters(te)
    opt = Riemannion(params, lr=lr, momentum=0.5)
    ids = token_ids(pipe)
    for _ in range(steps):
        opt.zero_grad()
        loss = denoiser_loss(kind, den) - sum(te(ids)[0].pow(2).mean() for te in tes.values())
        loss.backward()
        opt.step()
    return pipe


def deltas_of(pipe) -> dict:
    out = {}
    comps = {denoiser_name(pipe): denoiser(pipe), **clip_encoders(pipe)}
    for comp, model in comps.items():
        for name, layer in iter_adapters(model):
            out[f"{comp}.{name}"] = layer.delta_weight().detach().clone()
    return out


@functools.lru_cache(maxsize=None)
def trained(kind: str) -> Trained:
    base = make_tiny_pipeline(kind)
    base_output = run_pipeline(base, kind)
    pipe = train(copy.deepcopy(base), kind)
    return Trained(kind, base, pipe, deltas_of(pipe), base_output, run_pipeline(pipe, kind))


def fresh(kind: str):
    return copy.deepcopy(trained(kind).base)
