"""What differs between model families during training: prompts, latents, the denoiser call.

Each family is a small object with three methods, registered in :data:`FAMILIES`:

- ``encode(pipe, prompts, device, max_sequence_length) -> dict`` of conditioning
  tensors, each batch-first (B, ...);
- ``to_latents(pipe, sample) -> Tensor`` scales a VAE sample (B, C, h, w) into the
  space the denoiser works in;
- ``predict(pipe, denoiser, noisy, t, cond) -> Tensor`` (B, C, h, w), with ``t`` the
  integer timesteps (ε/v) or the flow sigmas in [0, 1] (flow matching).

Prompt encoding goes through the pipeline's own ``encode_prompt`` (which keeps the
autograd graph, so text-encoder adapters train through it).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FAMILIES", "Family", "FLUX_TRAIN_GUIDANCE"]

#: distilled guidance value fed to guidance-embedding Flux models during training
#: (diffusers' train_dreambooth_lora_flux.py default).
FLUX_TRAIN_GUIDANCE = 3.5


class Family:
    """Base: SD1.x/2.x (UNet, one CLIP encoder, ε or v prediction)."""

    name = "sd15"
    denoiser_attr = "unet"
    flow = False

    def encode(self, pipe, prompts: list[str], device, max_sequence_length: int) -> dict[str, Tensor]:
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return {"encoder_hidden_states": embeds}

    def to_latents(self, pipe, sample: Tensor) -> Tensor:
        return sample * pipe.vae.config.scaling_factor

    def predict(self, pipe, denoiser, noisy: Tensor, t: Tensor, cond: dict) -> Tensor:
        return denoiser(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


class SDXLFamily(Family):
    """SDXL: two CLIP encoders, pooled text embeddings and size/crop time ids."""

    name = "sdxl"

    def encode(self, pipe, prompts, device, max_sequence_length):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def predict(self, pipe, denoiser, noisy, t, cond):
        h, w = noisy.shape[-2] * pipe.vae_scale_factor, noisy.shape[-1] * pipe.vae_scale_factor
        # (original size, crop top-left, target size): an uncropped image at the training size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=noisy.device, dtype=noisy.dtype).repeat(len(noisy), 1)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
        return denoiser(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added,
                        return_dict=False)[0]


class SD3Family(Family):
    """SD3: MMDiT transformer, flow matching, three encoders (CLIP, CLIP, T5)."""

    name = "sd3"
    denoiser_attr = "transformer"
    flow = True

    def encode(self, pipe, prompts, device, max_sequence_length):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def to_latents(self, pipe, sample):
        cfg = pipe.vae.config
        return (sample - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def predict(self, pipe, denoiser, noisy, t, cond):
        timestep = t * pipe.scheduler.config.num_train_timesteps
        return denoiser(hidden_states=noisy, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                        pooled_projections=cond["pooled_projections"], return_dict=False)[0]


class FluxFamily(SD3Family):
    """Flux: 2×2-packed latent tokens with position ids, CLIP pooled + T5 sequence."""

    name = "flux"

    def encode(self, pipe, prompts, device, max_sequence_length):
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, num_images_per_prompt=1,
                                               max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, pipe, denoiser, noisy, t, cond):
        b, c, h, w = noisy.shape
        packed = pipe._pack_latents(noisy, b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(txt.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if getattr(denoiser.config, "guidance_embeds", False):
            guidance = torch.full((b,), FLUX_TRAIN_GUIDANCE, device=noisy.device, dtype=noisy.dtype)
        out = denoiser(hidden_states=packed, timestep=t.to(noisy.dtype), guidance=guidance,
                       pooled_projections=cond["pooled_projections"], encoder_hidden_states=txt,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)


#: family name (riemann_diffusion.presets.detect_family) -> its training behaviour.
FAMILIES: dict[str, Family] = {f.name: f for f in (Family(), SDXLFamily(), SD3Family(), FluxFamily())}
