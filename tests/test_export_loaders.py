"""Exported files through diffusers' real loaders, on the four tiny pipeline kinds.

After a few Riemannion steps the trained pipeline is saved; a fresh pipeline's
``load_lora_weights(file)`` must reproduce its output (max abs diff ≤ 1e-5, fp32)
and ``fuse_lora`` must give ``W0 + X − X0`` (effective scale 1), text encoders
included.
"""

import pytest
import torch

from export_support import KINDS, clip_encoders, denoiser, denoiser_name, fresh, run_pipeline, te_outputs, trained
from riemann_diffusion import inject_adapters
from riemann_diffusion.export import load_adapter, save_adapter

TOL = 1e-5


def _weight(module):
    return (module.base_layer if hasattr(module, "base_layer") else module).weight.detach()


def _component(pipe, comp):
    return getattr(pipe, comp)


@pytest.fixture(scope="module", params=KINDS)
def exported(request, tmp_path_factory):
    t = trained(request.param)
    path = tmp_path_factory.mktemp(t.kind) / "lora.safetensors"
    report = save_adapter(t.pipe, path, metadata={"base_model": f"tiny-{t.kind}"})
    return t, path, report


def test_auto_format_per_family(exported):
    t, path, report = exported
    assert report.format == ("kohya" if t.kind in ("sd15", "sdxl") else "peft")
    assert report.relative_error == 0.0 and report.rank == 4  # exact rank-2r export
    assert report.num_layers == len(t.deltas)
    lora = load_adapter(path)
    assert lora.family == t.kind and lora.metadata["base_model"] == f"tiny-{t.kind}"


def test_load_lora_weights_reproduces_trained_output(exported):
    t, path, _ = exported
    assert (t.output - t.base_output).abs().max() > 1e-3  # training changed the output
    pipe = fresh(t.kind)
    te_base = te_outputs(pipe)
    pipe.load_lora_weights(str(path))
    out = run_pipeline(pipe, t.kind)
    assert (out - t.output).abs().max().item() <= TOL
    te_loaded, te_trained = te_outputs(pipe), te_outputs(t.pipe)
    assert set(te_loaded) == set(clip_encoders(t.pipe)) and te_loaded
    for comp in te_loaded:  # the text-encoder LoRA was applied, as in memory
        assert (te_trained[comp] - te_base[comp]).abs().max() > 1e-3
        assert (te_loaded[comp] - te_trained[comp]).abs().max().item() <= TOL


def test_fuse_lora_gives_exact_update_with_scale_one(exported):
    t, path, _ = exported
    pipe, base = fresh(t.kind), t.base
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=[denoiser_name(pipe), *clip_encoders(pipe)])
    for name, delta in t.deltas.items():
        comp, module = name.split(".", 1)
        w0 = _weight(_component(base, comp).get_submodule(module))
        w = _weight(_component(pipe, comp).get_submodule(module))
        torch.testing.assert_close(w - w0, delta, rtol=0, atol=1e-6 + 1e-4 * delta.abs().max().item())


@pytest.mark.parametrize("kind,fmt", [("sd15", "peft"), ("sdxl", "diffusers"), ("flux", "diffusers")])
def test_other_formats_load_in_diffusers(kind, fmt, tmp_path):
    t = trained(kind)
    path = tmp_path / f"{fmt}.safetensors"
    save_adapter(t.pipe, path, format=fmt)
    keys = load_adapter(path).state_dict(fmt)
    assert all(k.startswith((denoiser_name(t.pipe) + ".", "text_encoder")) for k in keys)
    pipe = fresh(kind)
    if kind in ("sd3", "flux"):  # the metadata path ENVIRONMENT.md describes for DiTs
        sd, md = type(pipe).lora_state_dict(str(path), return_lora_metadata=True)
        assert md["transformer.r"] == md["transformer.lora_alpha"] == 4  # scale 1
        assert md["text_encoder.r"] == md["text_encoder.lora_alpha"] == 4
    pipe.load_lora_weights(str(path))
    assert (run_pipeline(pipe, kind) - t.output).abs().max().item() <= TOL


def test_step_zero_export_is_valid_and_changes_nothing(tmp_path):
    t = trained("sd15")
    pipe = fresh("sd15")
    inject_adapters(denoiser(pipe), "auto", rank=2)
    report = save_adapter(pipe, tmp_path / "zero.safetensors")
    lora = load_adapter(report.path)
    assert report.num_layers == len(lora.layers) > 0
    assert max(v.delta().abs().max().item() for v in lora.layers.values()) < 1e-6
    loaded = fresh("sd15")
    loaded.load_lora_weights(report.path)
    assert (run_pipeline(loaded, "sd15") - t.base_output).abs().max().item() <= TOL


def test_recompressed_export_fuses_to_truncated_svd(tmp_path):
    t = trained("sd15")
    report = save_adapter(t.pipe, tmp_path / "r1.safetensors", rank=1)
    kept = dropped = 0.0
    refs = {}
    for name, delta in t.deltas.items():
        U, S, Vh = torch.linalg.svd(delta.double())
        refs[name] = ((U[:, :1] * S[:1]) @ Vh[:1]).float()
        kept, dropped = kept + float((S[:1] ** 2).sum()), dropped + float((S[1:] ** 2).sum())
    assert report.rank == 1
    assert report.relative_error == pytest.approx((dropped / (kept + dropped)) ** 0.5, rel=1e-3)
    pipe = fresh("sd15")
    pipe.load_lora_weights(report.path)
    pipe.fuse_lora(components=["unet", "text_encoder"])
    for name, ref in refs.items():
        comp, module = name.split(".", 1)
        w0 = _weight(_component(t.base, comp).get_submodule(module))
        w = _weight(_component(pipe, comp).get_submodule(module))
        torch.testing.assert_close(w - w0, ref, rtol=0, atol=1e-6 + 1e-4 * ref.abs().max().item())
