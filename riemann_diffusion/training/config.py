"""One configuration tree for training: CLI flags, YAML/TOML files and the demo's defaults.

``TrainConfig`` holds one dataclass per concern. Every leaf name is unique across
the tree, so a key can be written short (``lr``, ``instance_dir``) or dotted
(``optim.lr``); dashes and underscores are interchangeable. Files may nest keys
under their section or write them flat. Unknown keys raise ``ConfigError`` with the
closest known key (difflib).

Defaults are chosen for the embedded tiny run (``riemann-diffusion train`` with no
arguments); the learning-rate defaults come from a sweep on the tiny UNet (see
``OptimConfig``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ConfigError", "TrainConfig", "BaseConfig", "DataConfig", "PriorConfig", "AdapterConfig", "OptimConfig",
    "LossConfig", "RunConfig", "ValidationConfig", "CheckpointConfig", "ExportConfig",
    "DEFAULT_LR", "ALIASES", "config_keys", "field_help", "load_config", "apply_overrides", "config_from_dict", "config_to_dict",
    "parse_value", "resolve_key",
]

#: default learning rate per Riemannion rule (tiny-UNet sweep, see OptimConfig).
DEFAULT_LR = {"heavy_ball": 30.0, "muon": 0.1}


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names what is expected."""


@dataclass
class BaseConfig:
    """The base pipeline and how it is run."""

    model: str = "tiny"  # local folder, hub id, or "tiny"/"tiny-sd15"/"tiny-sdxl"/"tiny-sd3"/"tiny-flux" (built offline)
    revision: str | None = None  # hub revision (branch, tag or commit)
    variant: str | None = None  # weight variant on the hub, e.g. "fp16"
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16": dtype of the frozen base; adapters stay fp32
    gradient_checkpointing: bool = False  # trade compute for activation memory
    cpu: bool = False  # force CPU even when an accelerator is present


@dataclass
class DataConfig:
    """Instance images and their preprocessing."""

    instance_dir: str | None = None  # folder of subject photos; None: bundled example images in <output_dir>/instance_images
    instance_prompt: str | None = None  # e.g. "a photo of sks dog"; None: the example prompt
    resolution: int | None = None  # square training size in pixels; None: the model's native size
    center_crop: bool = True  # centre crop (else a random crop per step)
    random_flip: bool = False  # horizontal flip with probability 1/2
    cache_latents: bool = True  # encode every image once (needs center_crop)
    cache_text_embeddings: bool = True  # encode prompts once (ignored when a text encoder trains)
    max_sequence_length: int = 77  # T5 tokens for SD3/Flux prompts


@dataclass
class PriorConfig:
    """DreamBooth prior preservation with class images."""

    prior_preservation: bool = False  # add the class-image loss
    class_prompt: str | None = None  # e.g. "a photo of a dog"; required with prior_preservation
    class_dir: str | None = None  # folder of class images; None: <output_dir>/class_images
    num_class_images: int = 100  # missing ones are generated with the base pipeline
    prior_loss_weight: float = 1.0  # weight of the class-image loss
    class_inference_steps: int = 25  # sampler steps when generating class images


@dataclass
class AdapterConfig:
    """Where the fixed-rank adapters go and how they start."""

    rank: int = 4  # r of every adapter; the exported LoRA has rank 2r (X − X0)
    targets: str | list[str] = "auto"  # "auto" (the family's preset), a preset name, a regex, or module names
    init: str = "orthonormal"  # "orthonormal" or "loi" (gradient-based, paper §5)
    init_scale: float = 1e-3  # ‖X0‖/‖W‖ of the orthonormal init
    loi_power_iters: int = 15  # LOI: power iterations of the gradient sketch (2q+2 backward passes)
    train_text_encoder: bool = False  # also adapt the CLIP text encoder(s) (q/k/v/out_proj)
    text_encoder_targets: str | list[str] = "clip"  # preset or names for text-encoder adapters


@dataclass
class OptimConfig:
    """Riemannion and the learning-rate schedule.

    Default lr (``None`` picks by rule, ``DEFAULT_LR``): heavy-ball 30, Muon 0.1.
    The heavy-ball step moves by lr·(1−β)·grad, so its lr scales inversely with the
    gradient size of the model (far larger than Adam's on the tiny random model); the
    Muon step moves by lr per unit singular value whatever the gradient scale. Both are
    the best held-out loss of ``benchmarks/bench_training.py sweep`` (default run, 100
    steps; heavy-ball 0.1…30, Muon 0.02…0.5) on the tiny random-weight UNet ONLY. On a
    real model set ``lr`` yourself: the paper used Muon lr 5e-6…4e-5 on SD 2 (rank 4).
    """

    rule: str = "heavy_ball"  # "heavy_ball" (seed paper) or "muon" (paper v2)
    lr: float | None = None  # None: DEFAULT_LR[rule] (tuned on the tiny model only)
    text_encoder_lr: float | None = None  # None: same as lr
    momentum: float = 0.9  # β
    weight_decay: float = 0.0  # decoupled, X ← (1 − lr·γ) X
    lr_schedule: str = "constant"  # "constant" | "linear" | "cosine"
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr


@dataclass
class LossConfig:
    """The denoising objective."""

    prediction: str = "auto"  # "auto" (from the model), "epsilon", "v_prediction" or "flow"
    snr_gamma: float | None = None  # min-SNR-γ weighting (ε/v only), e.g. 5.0
    noise_offset: float = 0.0  # offset noise strength (ε/v only), e.g. 0.05
    logit_mean: float = 0.0  # flow matching: σ = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0


@dataclass
class RunConfig:
    """Steps, batches and where results go."""

    output_dir: str = "outputs/default"  # checkpoints, logs, images, adapter
    max_steps: int = 200  # optimizer steps
    batch_size: int = 1  # instance images per process per micro-batch
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    seed: int = 0  # fixes init, data order, noise and timesteps
    resume: str | None = None  # None, "latest" or a checkpoint folder
    log_every: int = 1  # write a log row every N steps
    progress_bar: bool = True  # tqdm on the main process


@dataclass
class ValidationConfig:
    """Images generated during training (base vs adapted, same seed)."""

    validation_prompts: list[str] = field(default_factory=list)  # [] : the instance prompt
    validate_every: int = 100  # steps between validations; 0: only at the end; -1: never
    validation_steps: int = 20  # sampler steps per validation image
    guidance_scale: float = 5.0  # classifier-free guidance of validation images
    validation_seed: int = 0


@dataclass
class CheckpointConfig:
    """Resumable training checkpoints."""

    checkpoint_every: int = 100  # steps between checkpoints; 0: none
    checkpoint_limit: int = 2  # keep at most this many (oldest deleted); 0: keep all


@dataclass
class ExportConfig:
    """The final LoRA file(s)."""

    export_formats: list[str] = field(default_factory=lambda: ["auto"])  # formats of riemann_diffusion.export
    export_rank: int | None = None  # lossy re-compression to this rank; None: exact rank 2r
    adapter_name: str = "adapter"  # file stem in the output folder


@dataclass
class TrainConfig:
    """Everything a training run needs; ``TrainConfig()`` is the offline tiny default run."""

    base: BaseConfig = field(default_factory=BaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> "TrainConfig":
        """Check values and their combinations; raises ConfigError. Returns self."""
        _validate(self)
        return self

    @property
    def lr(self) -> float:
        """The effective learning rate (``optim.lr`` or the rule's default)."""
        return self.optim.lr if self.optim.lr is not None else DEFAULT_LR[self.optim.rule]


# --------------------------------------------------------------------------- keys
def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def config_keys() -> dict[str, tuple[str, str, object]]:
    """``{"section.leaf": (section, leaf, type)}`` for every leaf of the tree."""
    out = {}
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = (section, f.name, hints[f.name])
    return out


#: names users bring from diffusers' DreamBooth scripts and kohya -> our leaf names.
ALIASES = {
    "pretrained_model_name_or_path": "model", "learning_rate": "lr", "train_batch_size": "batch_size",
    "max_train_steps": "max_steps", "gradient_accumulation_steps": "gradient_accumulation",
    "with_prior_preservation": "prior_preservation", "class_data_dir": "class_dir",
    "instance_data_dir": "instance_dir", "validation_prompt": "validation_prompts",
    "validation_epochs": "validate_every", "checkpointing_steps": "checkpoint_every",
    "checkpoints_total_limit": "checkpoint_limit", "resume_from_checkpoint": "resume",
    "lr_scheduler": "lr_schedule", "lr_warmup_steps": "warmup_steps", "network_dim": "rank",
}


def _norm(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def resolve_key(key: str) -> str:
    """Map ``lr``, ``optim.lr``, ``--instance-dir`` ... to the dotted key; ConfigError if unknown."""
    keys = config_keys()
    k = _norm(key)
    k = ALIASES.get(k, k)
    if k in keys:
        return k
    by_leaf = {dotted.split(".", 1)[1]: dotted for dotted in keys}
    if k in by_leaf:
        return by_leaf[k]
    choices = list(by_leaf) + list(keys)
    close = difflib.get_close_matches(k, choices, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint} (known sections: {', '.join(_sections())})")


def field_help() -> dict[str, str]:
    """``{"section.leaf": the one-line reason written beside the field}`` (for ``--help``)."""
    import inspect
    import re

    out = {}
    for section, cls in _sections().items():
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"^\s+(\w+):[^#]*#\s*(.+)$", line)
            if m:
                out[f"{section}.{m.group(1)}"] = m.group(2).strip()
    return out


# --------------------------------------------------------------------------- values
def _is_list(tp) -> bool:
    return typing.get_origin(tp) is list


def _args(tp) -> tuple:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def parse_value(raw, tp, key: str = "value"):
    """Coerce ``raw`` (a CLI string, a list of strings, or a parsed YAML/TOML value) to ``tp``."""
    options = _args(tp)
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null") and type(None) in options):
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: None is not allowed; expected {_type_name(tp)}")
    if str in options and isinstance(raw, (list, tuple)) and len(raw) == 1:
        raw = raw[0]  # one CLI token for a "name or list" key means the name
    prefer_str = isinstance(raw, str) and not raw.startswith("[")
    for opt in sorted((o for o in options if o is not type(None)), key=lambda o: (o is str) != prefer_str):
        try:
            return _coerce(raw, opt, key)
        except (TypeError, ValueError):
            continue
    raise ConfigError(f"{key}: cannot use {raw!r}; expected {_type_name(tp)}")


def _coerce(raw, opt, key):
    if _is_list(opt):
        if isinstance(raw, str):
            raw = [raw] if not raw.startswith("[") else json.loads(raw)
        if not isinstance(raw, (list, tuple)):
            raise TypeError(key)
        return [str(x) for x in raw]
    if isinstance(raw, (list, tuple)):
        if len(raw) != 1:
            raise TypeError(key)
        raw = raw[0]
    if opt is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(key)
    if opt is int:
        if isinstance(raw, bool):
            raise TypeError(key)
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(key)
        return int(raw) if not isinstance(raw, str) else int(raw, 10)
    if opt is float:
        if isinstance(raw, bool):
            raise TypeError(key)
        return float(raw)
    if opt is str:
        if isinstance(raw, (dict, list)):
            raise TypeError(key)
        return str(raw)
    raise TypeError(f"unsupported type {opt}")


def _type_name(tp) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in _args(tp))


# --------------------------------------------------------------------------- tree <-> dict
def config_to_dict(cfg: TrainConfig) -> dict:
    """Nested plain dict (JSON/YAML-serializable)."""
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """Set ``{key: raw value}`` on ``cfg`` in place (keys short, dotted or dashed)."""
    keys = config_keys()
    for key, raw in overrides.items():
        dotted = resolve_key(key)
        section, leaf, tp = keys[dotted]
        setattr(getattr(cfg, section), leaf, parse_value(raw, tp, dotted))
    return cfg


def _flatten(data: dict, prefix: str = "") -> dict:
    sections = _sections()
    out = {}
    for key, value in data.items():
        k = _norm(str(key))
        if not prefix and k in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"section {k!r} must be a mapping of keys; got {value!r}")
            for sub, v in value.items():
                out[f"{k}.{_norm(str(sub))}"] = v
        else:
            out[prefix + k] = value
    return out


def config_from_dict(data: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from a nested or flat dict (unknown keys raise ConfigError)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping; got {type(data).__name__}")
    cfg = base if base is not None else TrainConfig()
    return apply_overrides(cfg, _flatten(data))


def load_config(path) -> TrainConfig:
    """Read a ``.yaml``/``.yml``/``.toml``/``.json`` config file into a TrainConfig."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif suffix in (".yaml", ".yml", ".json"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        raise ConfigError(f"config file must end in .yaml, .yml, .toml or .json; got {path.name!r}")
    return config_from_dict(data)


# --------------------------------------------------------------------------- validation
_CHOICES = {
    "base.mixed_precision": ("no", "bf16", "fp16"),
    "optim.rule": ("heavy_ball", "muon"),
    "optim.lr_schedule": ("constant", "linear", "cosine"),
    "loss.prediction": ("auto", "epsilon", "v_prediction", "flow"),
    "adapter.init": ("orthonormal", "loi"),
}


def _validate(cfg: TrainConfig) -> None:
    for dotted, allowed in _CHOICES.items():
        section, leaf = dotted.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value not in allowed:
            raise ConfigError(f"{dotted} must be one of {allowed}; got {value!r}")
    positive = {"adapter.rank": cfg.adapter.rank, "run.max_steps": cfg.run.max_steps,
                "run.batch_size": cfg.run.batch_size, "run.gradient_accumulation": cfg.run.gradient_accumulation,
                "run.log_every": cfg.run.log_every, "validation.validation_steps": cfg.validation.validation_steps}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1; got {value}")
    for key, value in {"optim.lr": cfg.optim.lr, "optim.text_encoder_lr": cfg.optim.text_encoder_lr}.items():
        if value is not None and not value > 0:
            raise ConfigError(f"{key} must be > 0; got {value}")
    if not 0 <= cfg.optim.momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1); got {cfg.optim.momentum}")
    if cfg.optim.weight_decay < 0 or cfg.optim.warmup_steps < 0:
        raise ConfigError("optim.weight_decay and optim.warmup_steps must be >= 0")
    if cfg.data.resolution is not None and (cfg.data.resolution < 8 or cfg.data.resolution % 8):
        raise ConfigError(f"data.resolution must be a multiple of 8 and >= 8; got {cfg.data.resolution}")
    if cfg.data.cache_latents and not cfg.data.center_crop:
        raise ConfigError("data.cache_latents needs data.center_crop=true (a random crop changes every step); "
                          "set cache_latents=false or center_crop=true")
    if cfg.prior.prior_preservation:
        if not cfg.prior.class_prompt:
            raise ConfigError("prior.prior_preservation needs prior.class_prompt (e.g. 'a photo of a dog')")
        if cfg.prior.num_class_images < 1:
            raise ConfigError(f"prior.num_class_images must be >= 1; got {cfg.prior.num_class_images}")
    if cfg.loss.snr_gamma is not None and cfg.loss.snr_gamma <= 0:
        raise ConfigError(f"loss.snr_gamma must be > 0; got {cfg.loss.snr_gamma}")
    if cfg.checkpoint.checkpoint_every < 0 or cfg.checkpoint.checkpoint_limit < 0:
        raise ConfigError("checkpoint.checkpoint_every and checkpoint.checkpoint_limit must be >= 0")
    if not cfg.export.export_formats:
        raise ConfigError("export.export_formats must name at least one format (e.g. ['auto'])")
    if cfg.export.export_rank is not None and cfg.export.export_rank < 1:
        raise ConfigError(f"export.export_rank must be >= 1; got {cfg.export.export_rank}")
    if not cfg.export.adapter_name or "/" in cfg.export.adapter_name or "\\" in cfg.export.adapter_name:
        raise ConfigError(f"export.adapter_name must be a plain file stem; got {cfg.export.adapter_name!r}")
