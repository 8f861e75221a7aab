"""Everything a training run sets up before its first step, and how it builds a batch.

``Session.create(config)`` checks the inputs (so bad input fails before any step),
loads the model, prepares images and caches, injects the adapters and builds
Riemannion. ``Session.batch(step, micro)`` and ``Session.loss(batch)`` give the
training loop the rest.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..examples_data import EXAMPLE_PROMPT, ensure_example_images
from ..injection import adapter_parameters, inject_adapters, iter_adapters
from ..optimizer import Riemannion
from . import losses
from .config import ConfigError, TrainConfig
from .data import dataset_index, ensure_class_images, load_image_folder, sample_generator, transform_image
from .models import WEIGHT_DTYPES, LoadedModel, load_pipeline, text_encoder_names

logger = logging.getLogger(__name__)

__all__ = ["Session", "Batch", "generation_kwargs"]


@dataclass
class Batch:
    latents: torch.Tensor  # (B, C, h, w) fp32
    noise: torch.Tensor  # (B, C, h, w)
    t: torch.Tensor  # (B,) int timesteps or flow sigmas
    is_prior: torch.Tensor  # (B,) bool
    prompts: list[str]
    cond: dict | None = None  # cached conditioning, or None (encode `prompts` with grad)


def generation_kwargs(model: LoadedModel, resolution: int, max_sequence_length: int) -> dict:
    """Extra pipeline-call arguments a family needs (size; T5 length for SD3/Flux)."""
    kw = dict(height=resolution, width=resolution)
    if model.family.flow:
        kw["max_sequence_length"] = max_sequence_length
    return kw


@dataclass
class Session:
    cfg: TrainConfig
    accelerator: object
    model: LoadedModel
    output_dir: Path
    resolution: int
    instance: list
    instance_prompt: str
    klass: list | None
    components: dict  # component name -> module holding adapters
    optimizer: Riemannion
    param_keys: list[str]
    scheduler: object = None  # DDPM scheduler for ε/v maths (None for flow)
    latent_cache: dict = field(default_factory=dict)
    text_cache: dict = field(default_factory=dict)
    flow_shift: float = 1.0

    # ------------------------------------------------------------------ setup
    @classmethod
    def create(cls, cfg: TrainConfig) -> "Session":
        from accelerate import Accelerator

        cfg.validate()
        accelerator = Accelerator(cpu=cfg.base.cpu or not torch.cuda.is_available())
        out = Path(cfg.run.output_dir)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        instance_dir = cfg.data.instance_dir
        if instance_dir is None:
            instance_dir = out / "instance_images"
            if accelerator.is_main_process:
                ensure_example_images(instance_dir)
            accelerator.wait_for_everyone()
        prompt = cfg.data.instance_prompt or (EXAMPLE_PROMPT if cfg.data.instance_dir is None else None)
        if not prompt:
            raise ConfigError("data.instance_prompt is required with your own instance_dir (e.g. 'a photo of sks dog')")
        # resolution is needed to load images; use the config's or a placeholder until the model says
        images = load_image_folder(instance_dir, cfg.data.resolution or 64, "instance")
        model = load_pipeline(cfg.base, accelerator.device, WEIGHT_DTYPES[cfg.base.mixed_precision])
        resolution = cfg.data.resolution or model.native_resolution
        if cfg.data.resolution is None and resolution != 64:
            images = load_image_folder(instance_dir, resolution, "instance")
        prediction = model.prediction if cfg.loss.prediction == "auto" else cfg.loss.prediction
        if (prediction == "flow") != model.family.flow:
            raise ConfigError(f"loss.prediction={cfg.loss.prediction!r} does not fit a {model.family.name} model "
                              f"(it predicts {model.prediction!r}); use 'auto'")
        model.prediction = prediction
        klass = cls._class_images(cfg, model, accelerator, out, resolution)
        session = cls(cfg=cfg, accelerator=accelerator, model=model, output_dir=out, resolution=resolution,
                      instance=images, instance_prompt=prompt, klass=klass, components={}, optimizer=None,
                      param_keys=[])
        session._schedulers()
        session._caches()
        session._inject()
        session._build_optimizer()
        return session

    @staticmethod
    def _class_images(cfg, model, accelerator, out, resolution):
        if not cfg.prior.prior_preservation:
            return None
        class_dir = Path(cfg.prior.class_dir) if cfg.prior.class_dir else out / "class_images"
        if accelerator.is_main_process:
            ensure_class_images(model.pipe, class_dir, cfg.prior.class_prompt, cfg.prior.num_class_images,
                                cfg.prior.class_inference_steps, cfg.run.seed,
                                generation_kwargs(model, resolution, cfg.data.max_sequence_length))
        accelerator.wait_for_everyone()
        return load_image_folder(class_dir, resolution, "class")

    def _schedulers(self):
        cfg = self.model.pipe.scheduler.config
        if self.model.prediction == "flow":
            self.flow_shift = 1.0 if getattr(cfg, "use_dynamic_shifting", False) else float(getattr(cfg, "shift", 1.0))
        else:
            from diffusers import DDPMScheduler

            self.scheduler = DDPMScheduler.from_config(cfg)

    @property
    def device(self):
        return self.accelerator.device

    @property
    def weight_dtype(self):
        return WEIGHT_DTYPES[self.cfg.base.mixed_precision]

    @property
    def denoiser(self):
        return self.model.denoiser

    @property
    def train_text(self) -> bool:
        return self.cfg.adapter.train_text_encoder

    # ------------------------------------------------------------------ caches
    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.model.pipe.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    def _caches(self):
        cfg = self.cfg.data
        if cfg.cache_latents:
            flips = (False, True) if cfg.random_flip else (False,)
            for kind, images in (("instance", self.instance), ("class", self.klass or [])):
                for i, item in enumerate(images):
                    for flip in flips:
                        px = transform_image(item.image, self.resolution, True, flip)[None]
                        self.latent_cache[(kind, i, flip)] = self._encode_pixels(px)
        if cfg.cache_text_embeddings and not self.train_text:
            for prompt in {self.instance_prompt, self.cfg.prior.class_prompt if self.klass else None} - {None}:
                with torch.no_grad():
                    self.text_cache[prompt] = self._encode_prompts([prompt])

    def _encode_prompts(self, prompts: list[str]) -> dict:
        return self.model.family.encode(self.model.pipe, prompts, self.device, self.cfg.data.max_sequence_length)

    # ------------------------------------------------------------------ adapters
    def _inject(self):
        acfg = self.cfg.adapter
        kwargs = {}
        if acfg.init == "loi":
            importlib.import_module("riemann_diffusion.loi")  # registers the "loi" initializer
            kwargs = dict(batch=self.batch(0, 0), loss_fn=lambda model, batch: self.loss(batch),
                          power_iters=acfg.loi_power_iters)
        comps = {self.model.family.denoiser_attr: self.denoiser}
        if acfg.train_text_encoder:
            names = text_encoder_names(self.model.pipe)
            if not names:
                raise ConfigError(f"adapter.train_text_encoder: {type(self.model.pipe).__name__} has no CLIP text encoder")
            comps.update({n: getattr(self.model.pipe, n) for n in names})
        for name, module in comps.items():
            is_denoiser = name == self.model.family.denoiser_attr
            targets = acfg.targets if is_denoiser else acfg.text_encoder_targets
            try:
                inject_adapters(module, targets=targets, rank=acfg.rank, init=acfg.init if is_denoiser else "orthonormal",
                                init_scale=acfg.init_scale, seed=self.cfg.run.seed,
                                **(kwargs if is_denoiser else {}))
            except ValueError as exc:
                raise ConfigError(f"adapter for {name}: {exc}") from None
        self.components = comps
        for module in comps.values():
            module.train()
        if self.cfg.base.gradient_checkpointing:
            for name, module in comps.items():
                if hasattr(module, "enable_gradient_checkpointing"):
                    module.enable_gradient_checkpointing()
                elif hasattr(module, "gradient_checkpointing_enable"):
                    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _build_optimizer(self):
        ocfg = self.cfg.optim
        groups = []
        for name, module in self.components.items():
            is_denoiser = name == self.model.family.denoiser_attr
            lr = self.cfg.lr if is_denoiser else (ocfg.text_encoder_lr or self.cfg.lr)
            groups.append({"params": adapter_parameters(module), "lr": lr, "initial_lr": lr, "component": name})
            for mod_name, _ in iter_adapters(module):
                self.param_keys += [f"{name}.{mod_name}.lora_A", f"{name}.{mod_name}.lora_B"]
        self.optimizer = Riemannion(groups, lr=self.cfg.lr, momentum=ocfg.momentum,
                                    weight_decay=ocfg.weight_decay, rule=ocfg.rule)

    def adapter_params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ batches
    @property
    def global_batch(self) -> int:
        run = self.cfg.run
        return run.batch_size * self.accelerator.num_processes * run.gradient_accumulation

    def _sample(self, kind: str, images: list, step: int, slot: int):
        seed = self.cfg.run.seed
        idx = dataset_index(seed, step * self.global_batch + slot, len(images), kind)
        gen = sample_generator(seed, step, slot, kind)
        flip = bool(self.cfg.data.random_flip and torch.rand((), generator=gen) < 0.5)
        if (kind, idx, flip) in self.latent_cache:
            mean, std = self.latent_cache[(kind, idx, flip)]
        else:
            px = transform_image(images[idx].image, self.resolution, self.cfg.data.center_crop, flip, gen)[None]
            mean, std = self._encode_pixels(px)
        sample = mean + std * torch.randn(mean.shape, generator=gen)
        latents = self.model.family.to_latents(self.model.pipe, sample)[0]
        lcfg = self.cfg.loss
        draw = losses.draw_noise(latents.shape, self.model.prediction,
                                 self.scheduler.config.num_train_timesteps if self.scheduler else 1000, gen,
                                 noise_offset=lcfg.noise_offset, logit_mean=lcfg.logit_mean,
                                 logit_std=lcfg.logit_std, shift=self.flow_shift)
        return latents, draw

    def batch(self, step: int, micro: int) -> Batch:
        """Micro-batch ``micro`` of optimizer step ``step`` for this process (instances, then class images)."""
        bs, rank, world = self.cfg.run.batch_size, self.accelerator.process_index, self.accelerator.num_processes
        slots = [micro * world * bs + rank * bs + j for j in range(bs)]
        parts = [("instance", self.instance, self.instance_prompt)]
        if self.klass:
            parts.append(("class", self.klass, self.cfg.prior.class_prompt))
        lat, noise, ts, prior, prompts = [], [], [], [], []
        for kind, images, prompt in parts:
            for slot in slots:
                latents, draw = self._sample(kind, images, step, slot)
                lat.append(latents)
                noise.append(draw.noise)
                ts.append(draw.t)
                prior.append(kind == "class")
                prompts.append(prompt)
        cond = None
        if self.text_cache:
            cond = {k: torch.cat([self.text_cache[p][k] for p in prompts]) for k in self.text_cache[prompts[0]]}
        return Batch(torch.stack(lat), torch.stack(noise), torch.stack(ts), torch.tensor(prior), prompts, cond)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The (prior-preserving, SNR-weighted) denoising loss of ``batch``: a scalar, fp32."""
        pred_kind, dev, wdt = self.model.prediction, self.device, self.weight_dtype
        latents, noise, t = batch.latents.to(dev), batch.noise.to(dev), batch.t.to(dev)
        noisy = losses.noisy_input(pred_kind, self.scheduler, latents, noise, t)
        cond = batch.cond if batch.cond is not None else self._encode_prompts(batch.prompts)
        cond = {k: v.to(dev, wdt) for k, v in cond.items()}
        pred = self.model.family.predict(self.model.pipe, self.denoiser, noisy.to(wdt), t, cond)
        tgt = losses.target(pred_kind, self.scheduler, latents, noise, t)
        weights = losses.loss_weights(pred_kind, self.scheduler, t, self.cfg.loss.snr_gamma).to(dev)
        per_sample = losses.per_sample_mse(pred, tgt) * weights
        return losses.combine_losses(per_sample, batch.is_prior.to(dev), self.cfg.prior.prior_loss_weight)
