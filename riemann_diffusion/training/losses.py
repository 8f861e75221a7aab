"""Denoising objectives: ε-/v-prediction and flow matching, min-SNR, offset noise, prior loss.

All functions work on one sample at a time for the random parts (so every sample's
noise and timestep come from its own generator) and on the batch for the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NoiseDraw", "draw_noise", "noisy_input", "target", "snr", "loss_weights", "per_sample_mse",
           "combine_losses"]


class NoiseDraw:
    """Noise (C, h, w) and the time of one sample: an int timestep (ε/v) or a sigma (flow)."""

    def __init__(self, noise: Tensor, t: Tensor):
        self.noise, self.t = noise, t


def draw_noise(shape, prediction: str, num_train_timesteps: int, generator: torch.Generator, *,
               noise_offset: float = 0.0, logit_mean: float = 0.0, logit_std: float = 1.0,
               shift: float = 1.0) -> NoiseDraw:
    """Noise and time for one sample of latent ``shape`` (C, h, w), drawn from ``generator``.

    ε/v: t ~ U{0, T−1}; offset noise adds ``noise_offset·N(0, 1)`` per channel.
    flow: σ = shift·u / (1 + (shift−1)·u) with u = sigmoid(N(logit_mean, logit_std)).
    """
    noise = torch.randn(shape, generator=generator)
    if prediction == "flow":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn((), generator=generator))
        sigma = shift * u / (1 + (shift - 1) * u)
        return NoiseDraw(noise, sigma)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], 1, 1), generator=generator)
    t = torch.randint(0, num_train_timesteps, (), generator=generator)
    return NoiseDraw(noise, t)


def noisy_input(prediction: str, scheduler, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t: DDPM ``add_noise`` (ε/v) or ``(1−σ)x0 + σε`` (flow). latents/noise (B, C, h, w), t (B,)."""
    if prediction == "flow":
        s = t.view(-1, 1, 1, 1).to(latents.dtype)
        return (1 - s) * latents + s * noise
    return scheduler.add_noise(latents, noise, t)


def target(prediction: str, scheduler, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the denoiser must output: ε, v = α·ε − σ·x0, or the flow velocity ε − x0."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if prediction == "flow":
        return noise - latents
    raise ValueError(f"prediction must be epsilon, v_prediction or flow; got {prediction!r}")


def snr(scheduler, t: Tensor) -> Tensor:
    """Signal-to-noise ratio α̅_t / (1 − α̅_t) of integer timesteps t (B,)."""
    ac = scheduler.alphas_cumprod.to(t.device)[t].float()
    return ac / (1 - ac)


def loss_weights(prediction: str, scheduler, t: Tensor, snr_gamma: float | None) -> Tensor:
    """Per-sample weights: 1, or min-SNR-γ (Hang et al. 2023) for ε / v targets."""
    if snr_gamma is None or prediction == "flow":
        return torch.ones(len(t))
    s = snr(scheduler, t)
    clipped = torch.clamp(s, max=snr_gamma)
    return clipped / (s + 1) if prediction == "v_prediction" else clipped / s.clamp(min=1e-12)


def per_sample_mse(pred: Tensor, tgt: Tensor) -> Tensor:
    """Mean squared error per sample, in fp32: (B, ...) -> (B,)."""
    return (pred.float() - tgt.float()).pow(2).flatten(1).mean(1)


def combine_losses(per_sample: Tensor, is_prior: Tensor, prior_loss_weight: float) -> Tensor:
    """mean(instance losses) + prior_loss_weight · mean(class losses) (DreamBooth)."""
    inst = per_sample[~is_prior]
    loss = inst.mean()
    if bool(is_prior.any()):
        loss = loss + prior_loss_weight * per_sample[is_prior].mean()
    return loss
