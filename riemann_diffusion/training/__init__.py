"""DreamBooth-style subject training with Riemannion.

    from riemann_diffusion.training import TrainConfig, train
    cfg = TrainConfig()                      # the offline tiny default run
    cfg.data.instance_dir = "photos/"        # or load_config("train.yaml")
    cfg.data.instance_prompt = "a photo of sks dog"
    result = train(cfg, callback=lambda step, total, loss, lr: True)
    print(result.adapter_path, result.grid_path, result.loss_plot_path)

Modules: ``config`` (the dataclass tree), ``data`` (images), ``models`` and
``families`` (pipelines), ``losses``, ``session`` (setup and batches),
``checkpoint``, ``validation``, ``loop`` (``train``) and ``cli``.
"""

from .config import ConfigError, TrainConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from .data import DataError
from .loop import NonFiniteLossError, TrainingCancelled, TrainResult, train

__all__ = [
    "ConfigError",
    "DataError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "TrainingCancelled",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "train",
]
