"""The training config tree: files, overrides, CLI flags, errors with suggestions, lr schedule."""

from __future__ import annotations

import argparse

import pytest
import yaml

from riemann_diffusion.training.cli import add_arguments, config_from_args
from riemann_diffusion.training.config import (DEFAULT_LR, ConfigError, TrainConfig, apply_overrides,
                                               config_from_dict, config_keys, config_to_dict, load_config,
                                               resolve_key)
from riemann_diffusion.training.loop import lr_factor


def _parser():
    parser = argparse.ArgumentParser(prog="riemann-diffusion train")
    add_arguments(parser)
    return parser


def test_defaults_are_the_tiny_offline_run():
    cfg = TrainConfig().validate()
    assert cfg.base.model == "tiny" and cfg.data.instance_dir is None
    assert cfg.lr == DEFAULT_LR["heavy_ball"]
    cfg.optim.rule = "muon"
    assert cfg.lr == DEFAULT_LR["muon"]
    leaves = [dotted.split(".")[1] for dotted in config_keys()]
    assert len(leaves) == len(set(leaves))  # short keys are unambiguous


def test_yaml_nested_and_flat_toml(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "optim:\n  lr: 0.05\n  rule: muon\nrank: 8\ninstance-prompt: a photo of sks dog\n"
        "validation:\n  validation_prompts: ['a dog', 'a cat, sitting']\nadapter:\n  targets: [to_q, to_v]\n")
    cfg = load_config(tmp_path / "a.yaml").validate()
    assert (cfg.optim.lr, cfg.optim.rule, cfg.adapter.rank) == (0.05, "muon", 8)
    assert cfg.data.instance_prompt == "a photo of sks dog"
    assert cfg.validation.validation_prompts == ["a dog", "a cat, sitting"]
    assert cfg.adapter.targets == ["to_q", "to_v"]
    (tmp_path / "b.toml").write_text('[run]\nmax_steps = 7\nseed = 3\n[prior]\nprior_preservation = true\n'
                                     'class_prompt = "a dog"\n')
    cfg = load_config(tmp_path / "b.toml").validate()
    assert (cfg.run.max_steps, cfg.run.seed, cfg.prior.prior_preservation) == (7, 3, True)
    # round trip through a plain dict
    assert config_to_dict(config_from_dict(config_to_dict(cfg))) == config_to_dict(cfg)


@pytest.mark.parametrize("key,suggestion", [("rnak", "rank"), ("optim.learnig_rate", "lr"),
                                            ("instance_dri", "instance_dir"), ("max-step", "max_steps")])
def test_unknown_keys_suggest_the_close_match(tmp_path, key, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key.*{suggestion}"):
        resolve_key(key)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({key: 1}))
    with pytest.raises(ConfigError, match=suggestion):
        load_config(tmp_path / "c.yaml")


def test_aliases_from_diffusers_scripts():
    assert resolve_key("learning_rate") == "optim.lr"
    assert resolve_key("--pretrained-model-name-or-path") == "base.model"
    assert resolve_key("with_prior_preservation") == "prior.prior_preservation"


@pytest.mark.parametrize("overrides,match", [
    ({"rank": "0"}, "rank must be >= 1"),
    ({"rule": "adam"}, "optim.rule must be one of"),
    ({"lr": "-1"}, "optim.lr must be > 0"),
    ({"momentum": "1.0"}, "momentum"),
    ({"cache_latents": "true", "center_crop": "false"}, "cache_latents needs"),
    ({"prior_preservation": "yes"}, "class_prompt"),
    ({"resolution": "100"}, "multiple of 8"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
])
def test_invalid_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(TrainConfig(), overrides).validate()


@pytest.mark.parametrize("raw", ["abc", "1.5"])
def test_type_errors_name_the_key(raw):
    with pytest.raises(ConfigError, match=r"run.max_steps: cannot use .*expected int"):
        apply_overrides(TrainConfig(), {"max_steps": raw})


def test_cli_flags_short_dotted_and_file(tmp_path):
    (tmp_path / "f.yaml").write_text("run:\n  max_steps: 9\noptim:\n  lr: 0.2\n")
    args = _parser().parse_args([
        "--config", str(tmp_path / "f.yaml"), "--model", "tiny-sdxl", "--instance-dir", "photos",
        "--instance-prompt", "a photo of sks dog", "--optim.lr", "0.01", "--random-flip", "--cache-latents", "false",
        "--center-crop", "false", "--validation-prompts", "a dog", "a dog, on grass", "--targets", "sdxl",
        "--learning-rate", "0.03", "--export-rank", "none"])
    cfg = config_from_args(args)
    assert cfg.run.max_steps == 9  # from the file
    assert cfg.optim.lr == 0.03  # a flag overrides the file; the last alias wins
    assert (cfg.base.model, cfg.data.instance_dir, cfg.data.random_flip) == ("tiny-sdxl", "photos", True)
    assert cfg.validation.validation_prompts == ["a dog", "a dog, on grass"]
    assert cfg.adapter.targets == "sdxl" and cfg.export.export_rank is None


def test_cli_unknown_flag_suggests(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--rnak", "4"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --rnak" in err and "did you mean --rank" in err


def test_print_config(capsys):
    from riemann_diffusion.cli import main

    assert main(["train", "--print-config", "--lr", "0.3", "--rule", "muon"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.3 and printed["optim"]["rule"] == "muon"
    assert main(["train", "--rank", "0"]) == 2
    assert "rank must be >= 1" in capsys.readouterr().err


def test_lr_schedule():
    assert [lr_factor(s, "constant", 2, 10) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, "linear", 2, 10) == 1.0 and lr_factor(6, "linear", 2, 10) == pytest.approx(0.5)
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5)
    assert lr_factor(10, "cosine", 0, 10) == pytest.approx(1e-3)  # never exactly zero (Riemannion needs lr > 0)


def test_example_config_is_the_default_run():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_tiny.yaml"
    assert config_to_dict(load_config(path)) == config_to_dict(TrainConfig())
