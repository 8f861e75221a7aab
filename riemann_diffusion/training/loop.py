"""The training loop: steps, gradient sync, NaN guard, logs, validation, checkpoints, export.

``train(config, callback=None) -> TrainResult`` is the one entry point the CLI, the
Gradio demo and the ComfyUI node share. ``callback(step, total, loss, lr)`` runs
after every optimizer step (on every process); returning ``False`` or raising
:class:`TrainingCancelled` stops the run after saving a checkpoint.

Several processes (``accelerate launch``) split each global batch by slot; the
adapter gradients are averaged with one all-reduce, so every rank takes the same
Riemannion step and the result equals a one-process run with the same global batch.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..state import adapter_state
from .checkpoint import ADAPTER_FILE, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from .config import TrainConfig, config_from_dict, config_to_dict
from .session import Session, generation_kwargs
from .validation import generate_images, plot_loss, save_grid

logger = logging.getLogger(__name__)

__all__ = ["train", "TrainResult", "TrainingCancelled", "NonFiniteLossError", "lr_factor"]


class TrainingCancelled(Exception):
    """Raise from a progress callback to stop training (a checkpoint is kept)."""


class NonFiniteLossError(RuntimeError):
    """The loss or a gradient became NaN/Inf; the adapter was not updated with it."""


@dataclass
class TrainResult:
    """Where a run left its results (paths are None when not produced)."""

    output_dir: Path
    adapter_path: Path | None = None  # the LoRA file in the first export format
    adapter_paths: dict = field(default_factory=dict)  # format -> file
    adapter_state_path: Path | None = None  # our own factor state (resume/re-export)
    grid_path: Path | None = None  # base vs adapted validation grid
    validation_dir: Path | None = None
    loss_plot_path: Path | None = None
    log_path: Path | None = None  # JSONL; the CSV sits next to it
    checkpoint_path: Path | None = None  # last checkpoint written
    steps: int = 0
    final_loss: float | None = None
    cancelled: bool = False
    seconds: float = 0.0
    export_error: str | None = None
    state: dict = field(default_factory=dict)  # adapter tensors (CPU), as in adapter_state.safetensors


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): warm-up, then the schedule."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(1.0 - progress, 1e-3)
    if schedule == "cosine":
        return max(0.5 * (1 + math.cos(math.pi * progress)), 1e-3)
    raise ValueError(f"unknown lr schedule {schedule!r}")


class _Logs:
    """JSONL + CSV (+ tensorboard when installed) on the main process."""

    FIELDS = ("step", "loss", "lr", "it_s", "elapsed_s")

    def __init__(self, out: Path, enabled: bool, keep_until: int | None):
        self.enabled = enabled
        self.jsonl, self.csv = out / "log.jsonl", out / "log.csv"
        self.records: list[dict] = []
        self.tb = None
        if not enabled:
            return
        if keep_until is not None and self.jsonl.exists():
            rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
            self.records = [r for r in rows if r.get("step", 0) <= keep_until]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.records)
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def add(self, record: dict):
        if not self.enabled:
            return
        self.records.append(record)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        with self.csv.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS, extrasaction="ignore").writerow(record)
        if self.tb is not None:
            self.tb.add_scalar("loss", record["loss"], record["step"])
            self.tb.add_scalar("lr", record["lr"], record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


class Trainer:
    def __init__(self, cfg: TrainConfig, callback=None):
        self.cfg, self.callback = cfg, callback
        self.s = Session.create(cfg)
        self.acc = self.s.accelerator
        self.out = self.s.output_dir
        self.main = self.acc.is_main_process
        self.result = TrainResult(output_dir=self.out)
        self.validation_columns: list[tuple[str, list]] = []
        self.prompts = cfg.validation.validation_prompts or [self.s.instance_prompt]

    # ------------------------------------------------------------------ pieces
    def _metadata(self) -> dict:
        c = self.cfg
        return {"base_model": self.s.model.model_id, "family": self.s.model.family.name,
                "targets": c.adapter.targets, "rank": c.adapter.rank, "init": c.adapter.init,
                "text_encoder": c.adapter.train_text_encoder, "instance_prompt": self.s.instance_prompt,
                "resolution": self.s.resolution, "prediction": self.s.model.prediction,
                "optimizer": {"name": "Riemannion", "rule": c.optim.rule, "lr": c.lr, "momentum": c.optim.momentum,
                              "weight_decay": c.optim.weight_decay, "schedule": c.optim.lr_schedule}}

    def _set_lr(self, step: int) -> float:
        o = self.cfg.optim
        f = lr_factor(step, o.lr_schedule, o.warmup_steps, self.cfg.run.max_steps)
        for g in self.s.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return self.s.optimizer.param_groups[0]["lr"]

    def _sync(self, loss_sum: torch.Tensor) -> float:
        """Average adapter gradients and the loss over processes; returns the mean loss."""
        params = self.s.adapter_params()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.acc.num_processes > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss_sum.reshape(1).float()])
            torch.distributed.all_reduce(flat)
            flat /= self.acc.num_processes
            offset = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p))
                offset += n
            loss_sum = flat[-1]
        return float(loss_sum)

    def _check_finite(self, loss: float, step: int, lr: float):
        bad_grad = any(not torch.isfinite(p.grad).all() for p in self.s.adapter_params())
        if math.isfinite(loss) and not bad_grad:
            return
        what = f"loss {loss}" if not math.isfinite(loss) else "a NaN/Inf adapter gradient"
        last = self.result.checkpoint_path
        raise NonFiniteLossError(
            f"training stopped at step {step + 1}: {what} (lr {lr:g}). The adapter was not updated with it; "
            f"the last good checkpoint is {str(last) if last else 'none (no checkpoint written yet)'}. "
            f"Try a lower optim.lr, base.mixed_precision=no, or check the training images.")

    def _checkpoint(self, step: int):
        if self.main:
            self.result.checkpoint_path = save_checkpoint(
                self.out, step, self.s.components, self.s.optimizer, self.s.param_keys,
                {"samples_seen": step * self.s.global_batch, "config": config_to_dict(self.cfg)},
                self.cfg.checkpoint.checkpoint_limit, self._metadata())
        self.acc.wait_for_everyone()

    def _validate(self, step: int):
        vcfg = self.cfg.validation
        if not self.main:
            return
        kwargs = dict(steps=vcfg.validation_steps, guidance_scale=vcfg.guidance_scale, seed=vcfg.validation_seed,
                      **generation_kwargs(self.s.model, self.s.resolution, self.cfg.data.max_sequence_length))
        pipe, comps = self.s.model.pipe, self.s.components
        if not self.validation_columns:
            self.validation_columns.append(("base", generate_images(pipe, comps, self.prompts, adapter_scale=0.0,
                                                                    **kwargs)))
        images = generate_images(pipe, comps, self.prompts, adapter_scale=1.0, **kwargs)
        vdir = self.out / "validation"
        vdir.mkdir(exist_ok=True)
        for i, im in enumerate(images):
            im.save(vdir / f"step-{step:06d}_prompt-{i}.png")
        for i, im in enumerate(self.validation_columns[0][1]):
            im.save(vdir / f"base_prompt-{i}.png")
        self.validation_columns.append((f"step {step}", images))
        cols = [self.validation_columns[0]] + self.validation_columns[1:][-5:]
        self.result.grid_path = save_grid(cols, self.prompts, self.out / "validation_grid.png")
        self.result.validation_dir = vdir

    def _export(self):
        state = {k: v.detach().cpu().clone() for k, v in adapter_state(self.s.components).items()}
        self.result.state = state
        if not self.main:
            return
        from safetensors.torch import save_file

        from ..state import encode_metadata

        self.result.adapter_state_path = self.out / ADAPTER_FILE
        tmp = self.out / (ADAPTER_FILE + ".tmp")
        save_file(state, tmp, metadata=encode_metadata(self._metadata()))
        tmp.replace(self.result.adapter_state_path)
        try:
            from ..export import save_adapter
        except ImportError as exc:
            self.result.export_error = f"riemann_diffusion.export is unavailable ({exc}); only {ADAPTER_FILE} written"
            logger.warning(self.result.export_error)
            return
        pipe, comps = self.s.model.pipe, self.s.components
        for fmt in self.cfg.export.export_formats:
            suffix = "" if fmt == self.cfg.export.export_formats[0] else f"_{fmt}"
            path = self.out / f"{self.cfg.export.adapter_name}{suffix}.safetensors"
            save_adapter(self.s.denoiser, path, format=fmt, rank=self.cfg.export.export_rank,
                         text_encoder=pipe.text_encoder if "text_encoder" in comps else None,
                         text_encoder_2=pipe.text_encoder_2 if "text_encoder_2" in comps else None,
                         metadata=self._metadata())
            self.result.adapter_paths[fmt] = path
        self.result.adapter_path = next(iter(self.result.adapter_paths.values()), None)

    def _resume(self) -> int:
        path = resolve_resume(self.out, self.cfg.run.resume)
        if path is None:
            old = list_checkpoints(self.out)
            if old and not self.cfg.run.resume:
                logger.warning("%s already holds checkpoints up to step %d; starting over (pass resume=latest "
                               "to continue that run)", self.out, old[-1][0])
            return 0
        state = load_checkpoint(path, self.s.components, self.s.optimizer, self.s.param_keys)
        old = config_from_dict(state["config"])
        for key in ("base", "adapter", "loss", "data"):
            if config_to_dict(old)[key] != config_to_dict(self.cfg)[key]:
                logger.warning("resuming with different %s settings than the checkpoint was trained with", key)
        self.result.checkpoint_path = path
        return int(state["step"])

    def _write_config(self):
        if self.main:
            text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
            (self.out / "config.yaml").write_text(text, encoding="utf-8")

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, s = self.cfg, self.s
        start = self._resume()
        self._write_config()
        logs = _Logs(self.out, self.main, keep_until=start)
        total = cfg.run.max_steps
        bar = tqdm(total=total, initial=start, desc="train", disable=not (self.main and cfg.run.progress_bar),
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        last_time, loss = t0, None
        try:
            for step in range(start, total):
                lr = self._set_lr(step)
                loss_sum = torch.zeros((), device=s.device)
                for micro in range(cfg.run.gradient_accumulation):
                    micro_loss = s.loss(s.batch(step, micro)) / cfg.run.gradient_accumulation
                    micro_loss.backward()
                    loss_sum += micro_loss.detach()
                loss = self._sync(loss_sum)
                self._check_finite(loss, step, lr)
                s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
                done = step + 1
                now = time.perf_counter()
                it_s = 1.0 / max(now - last_time, 1e-9)
                last_time = now
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", it_s=f"{it_s:.1f}")
                if done % cfg.run.log_every == 0 or done == total:
                    logs.add({"step": done, "loss": loss, "lr": lr, "it_s": round(it_s, 3),
                              "elapsed_s": round(now - t0, 3)})
                if not self._keep_going(done, total, loss, lr):
                    self._checkpoint(done)
                    self.result.cancelled = True
                    break
                ve = cfg.validation.validate_every
                if ve > 0 and done % ve == 0 and done < total:
                    self._validate(done)
                ce = cfg.checkpoint.checkpoint_every
                if ce and done % ce == 0 and done < total:
                    self._checkpoint(done)
            else:
                done = total
                if cfg.checkpoint.checkpoint_every:
                    self._checkpoint(done)
                if cfg.validation.validate_every >= 0:
                    self._validate(done)
                self._export()
            self.acc.wait_for_everyone()
        finally:
            bar.close()
            logs.close()
        self.result.steps = done
        self.result.final_loss = loss
        self.result.seconds = time.perf_counter() - t0
        if self.main:
            self.result.log_path = logs.jsonl
            self.result.loss_plot_path = plot_loss(logs.records, self.out / "loss_curve.png")
        return self.result

    def _keep_going(self, step, total, loss, lr) -> bool:
        if self.callback is None:
            return True
        try:
            return self.callback(step, total, loss, lr) is not False
        except TrainingCancelled:
            return False


def train(config: TrainConfig | dict | None = None, callback=None) -> TrainResult:
    """Run DreamBooth-style adapter training; ``train()`` alone is the offline tiny default run.

    Args:
        config: a TrainConfig, a nested/flat dict of keys, or None for the defaults.
        callback: optional ``fn(step, total, loss, lr)``; return False (or raise
            TrainingCancelled) to stop after a checkpoint.

    Raises ConfigError / DataError before the first step on bad input, and
    NonFiniteLossError if the loss becomes NaN/Inf.
    """
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = config_from_dict(config)
    return Trainer(config, callback).run()
