"""End-to-end tiny training (riemann_diffusion.training): UNet and DiT paths, prior preservation,
text-encoder adapters, the NaN guard, cancellation and the CLI default command.

Each run is a few steps on the offline tiny pipelines at 64x64; the exported files are
checked with diffusers' own loader against our adapter maths.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from riemann_diffusion.injection import inject_adapters
from riemann_diffusion.state import load_adapter_state_into
from riemann_diffusion.tiny import make_tiny_pipeline
from riemann_diffusion.training import NonFiniteLossError, TrainConfig, apply_overrides, train

FAST = {"max_steps": 3, "validation_steps": 2, "progress_bar": False, "checkpoint_every": 0}


def _cfg(tmp_path, **overrides) -> TrainConfig:
    cfg = TrainConfig()
    return apply_overrides(cfg, {**FAST, "output_dir": str(tmp_path / "out"), **overrides})


def _denoiser_out(denoiser, family, seed=0):
    """One denoiser call on fixed random inputs (fp32)."""
    g = torch.Generator().manual_seed(seed)
    if family == "sd15":
        x = torch.randn(1, 4, 8, 8, generator=g)
        return denoiser(x, torch.tensor([500]), encoder_hidden_states=torch.randn(1, 7, 32, generator=g)).sample
    x = torch.randn(1, 4, 8, 8, generator=g)
    return denoiser(hidden_states=x, timestep=torch.tensor([500.0]),
                    encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
                    pooled_projections=torch.randn(1, 64, generator=g)).sample


@pytest.mark.parametrize("kind,component,denoiser_family", [("sd15", "unet", "sd15"), ("sd3", "transformer", "sd3")])
def test_train_export_loads_in_diffusers(tmp_path, kind, component, denoiser_family):
    result = train(_cfg(tmp_path, model=f"tiny-{kind}", validate_every=2))
    out = tmp_path / "out"
    # outputs a user looks at
    assert result.adapter_path == out / "adapter.safetensors" and result.adapter_path.is_file()
    assert result.grid_path.is_file() and result.loss_plot_path.is_file()
    assert sorted(p.name for p in (out / "validation").iterdir()) == [
        "base_prompt-0.png", "step-000002_prompt-0.png", "step-000003_prompt-0.png"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 and r["lr"] > 0 for r in rows)
    assert (out / "log.csv").read_text().splitlines()[0].startswith("step,loss,lr")
    # the adapter moved away from its start
    state = load_file(out / "adapter_state.safetensors")
    moved = [k for k in state if k.endswith(".lora_B") and not torch.equal(state[k], state[k + "0"])]
    assert moved and all(k.startswith(component + ".") for k in state)

    # diffusers' loader on a fresh base pipeline reproduces our adapted denoiser
    base = make_tiny_pipeline(kind)
    den = getattr(base, component)
    with torch.no_grad():
        ref = _denoiser_out(den, denoiser_family)
        base.load_lora_weights(str(result.adapter_path))
        loaded = _denoiser_out(den, denoiser_family)
    ours = getattr(make_tiny_pipeline(kind), component)
    inject_adapters(ours, targets=kind, rank=4)
    load_adapter_state_into({component: ours}, result.state)
    with torch.no_grad():
        expected = _denoiser_out(ours, denoiser_family)
    assert (loaded - ref).abs().max() > 1e-4  # the LoRA changes the output
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)


def test_flux_trains_and_exports_transformer_keys(tmp_path):
    result = train(_cfg(tmp_path, model="tiny-flux", max_steps=2, validate_every=-1))
    keys = load_file(result.adapter_path).keys()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any("single_transformer_blocks" in k for k in keys)
    assert result.grid_path is None and result.final_loss > 0


def test_sdxl_text_encoders_export_te1_te2(tmp_path):
    result = train(_cfg(tmp_path, model="tiny-sdxl", train_text_encoder=True, max_steps=2, validate_every=-1))
    keys = set(load_file(result.adapter_path))
    prefixes = {k.split("_", 2)[0] + "_" + k.split("_", 2)[1] for k in keys}
    assert {"lora_unet", "lora_te1", "lora_te2"} <= prefixes
    assert any(k.startswith("lora_te1_") and "q_proj" in k for k in keys)
    # the text-encoder adapters trained (their factors moved)
    moved = [k for k, v in result.state.items() if k.startswith("text_encoder") and k.endswith("lora_B")
             and not torch.equal(v, result.state[k + "0"])]
    assert moved
    # diffusers loads the text-encoder part and it changes the prompt embedding
    pipe = make_tiny_pipeline("sdxl")
    ids = pipe.tokenizer(["a photo of sks toy"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(result.adapter_path))
        after = pipe.text_encoder(ids)[0]
    assert (after - before).abs().max() > 1e-5


def test_prior_preservation_generates_class_images_and_changes_training(tmp_path):
    common = dict(max_steps=2, validate_every=-1)
    plain = train(_cfg(tmp_path / "a", **common))
    prior = train(_cfg(tmp_path / "b", prior_preservation=True, class_prompt="a photo of a toy", num_class_images=2,
                       class_inference_steps=2, **common))
    class_dir = tmp_path / "b" / "out" / "class_images"
    from PIL import Image

    files = sorted(class_dir.glob("*.png"))
    assert [f.name for f in files] == ["class_00000.png", "class_00001.png"]
    assert Image.open(files[0]).size == (64, 64)
    key = next(k for k in plain.state if k.endswith(".lora_B"))
    assert not torch.equal(plain.state[key], prior.state[key])  # the class loss takes part
    # a later run finds the class images and generates none (the pipeline is never called)
    from riemann_diffusion.training.data import ensure_class_images

    def no_call(*a, **k):
        raise AssertionError("class images were regenerated")

    assert ensure_class_images(no_call, class_dir, "a photo of a toy", 2, 2, 0, {}) == 0
    assert ensure_class_images(lambda *a, **k: type("R", (), {"images": [Image.new("RGB", (8, 8))]}), class_dir,
                               "a photo of a toy", 3, 2, 0, {}) == 1
    assert (class_dir / "class_00002.png").is_file()


def test_prior_batch_holds_instance_then_class_samples(tmp_path):
    from riemann_diffusion.training.session import Session

    cfg = _cfg(tmp_path, prior_preservation=True, class_prompt="a photo of a toy", num_class_images=1,
               class_inference_steps=1, batch_size=2)
    s = Session.create(cfg)
    b = s.batch(0, 0)
    assert b.is_prior.tolist() == [False, False, True, True]
    assert b.prompts == ["a photo of sks toy"] * 2 + ["a photo of a toy"] * 2
    assert b.latents.shape == (4, 4, 8, 8)


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    a = train(_cfg(tmp_path / "a", max_steps=2, validate_every=-1))
    b = train(_cfg(tmp_path / "b", max_steps=2, validate_every=-1, gradient_checkpointing=True))
    for k in a.state:
        torch.testing.assert_close(a.state[k], b.state[k], rtol=1e-4, atol=1e-6)


def test_options_v_prediction_min_snr_offset_noise_bf16_loi(tmp_path):
    r = train(_cfg(tmp_path / "v", max_steps=2, validate_every=-1, prediction="v_prediction", snr_gamma=5.0,
                   noise_offset=0.05, lr_schedule="cosine", warmup_steps=1, rule="muon"))
    assert r.final_loss > 0 and all(torch.isfinite(v).all() for v in r.state.values())
    r = train(_cfg(tmp_path / "bf", max_steps=2, validate_every=-1, mixed_precision="bf16", init="loi",
                   loi_power_iters=1))
    assert all(v.dtype == torch.float32 for v in r.state.values())  # adapters stay fp32 on a bf16 base
    assert r.adapter_path.is_file()


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    from riemann_diffusion.training.session import Session

    original = Session.loss
    calls = {"n": 0}

    def loss(self, batch):
        calls["n"] += 1
        value = original(self, batch)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(Session, "loss", loss)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss nan.*step-00000002"):
        train(_cfg(tmp_path, max_steps=4, checkpoint_every=2, validate_every=-1))
    out = tmp_path / "out"
    state = load_file(out / "checkpoints" / "step-00000002" / "adapter_state.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (out / "adapter.safetensors").exists()


def test_callback_cancels_and_keeps_a_checkpoint(tmp_path):
    seen = []

    def callback(step, total, loss, lr):
        seen.append((step, total))
        return step < 2

    r = train(_cfg(tmp_path, max_steps=5, validate_every=-1), callback=callback)
    assert r.cancelled and seen == [(1, 5), (2, 5)]
    assert r.checkpoint_path.name == "step-00000002" and r.adapter_path is None


def test_cli_runs_and_prints_where_results_are(tmp_path, capsys):
    from riemann_diffusion.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "--output-dir", str(out), "--max-steps", "2", "--validation-steps", "2",
               "--progress-bar", "false", "--checkpoint-every", "0"])
    text = capsys.readouterr().out
    assert rc == 0
    for name in ("adapter.safetensors", "validation_grid.png", "loss_curve.png"):
        assert str(out / name) in text and (out / name).is_file()
    assert len(list((out / "instance_images").glob("*.png"))) == 4  # the bundled example images
