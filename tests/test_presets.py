"""Presets per family (DESIGN.md §9) and family detection, on the tiny diffusers models."""
import pytest
import torch

from riemann_diffusion import inject_adapters, match_targets, remove_adapters
from riemann_diffusion.injection import PRESETS
from riemann_diffusion.presets import FAMILY_PRESETS, default_targets, detect_family
from riemann_diffusion.tiny import make_tiny_pipeline, make_tiny_unet


@pytest.fixture(scope="module")
def pipes():
    return {k: make_tiny_pipeline(k) for k in ("sd15", "sdxl", "sd3", "flux")}


def _den(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _suffixes(names):
    import re
    return {re.sub(r"^.*\.\d+\.(?=\D)", "", n) for n in names}


def test_registered_presets():
    for name in ("sd15", "sdxl", "sd3", "flux", "flux_ff", "clip", "auto"):
        assert name in PRESETS


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_detect_family_from_pipeline_and_model(pipes, kind):
    assert detect_family(pipes[kind]) == kind
    assert detect_family(_den(pipes[kind])) == kind
    assert detect_family(pipes[kind].text_encoder) == "clip"


def test_detect_family_unknown_model_names_class():
    with pytest.raises(ValueError, match="Sequential"):
        detect_family(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("kind,expected", [
    ("sd15", {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
              "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}),
    ("sdxl", {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
              "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}),
    ("sd3", {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"}),  # last SD3 block: no to_add_out
    ("flux", {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "proj_out"}),
])
def test_auto_targets_match_design(pipes, kind, expected):
    den = _den(pipes[kind])
    names = match_targets(den, "auto")
    assert names == match_targets(den, kind)
    assert _suffixes(names) == expected
    if kind == "flux":  # single blocks' attention and proj_out, not the model's final proj_out
        assert "proj_out" not in names
        assert "single_transformer_blocks.0.proj_out" in names
        assert "single_transformer_blocks.0.attn.to_q" in names
    assert default_targets(den) == FAMILY_PRESETS[kind]


def test_flux_ff_adds_feed_forwards(pipes):
    names = set(match_targets(_den(pipes["flux"]), "flux_ff"))
    extra = names - set(match_targets(_den(pipes["flux"]), "flux"))
    assert {n.split(".", 2)[2] for n in extra} == {"ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"}


def test_clip_preset_on_text_encoder(pipes):
    names = match_targets(pipes["sd15"].text_encoder, "clip")
    assert len(names) == 4 * 5 and _suffixes(names) == {"self_attn.q_proj", "self_attn.k_proj",
                                                         "self_attn.v_proj", "self_attn.out_proj"}


def test_no_match_lists_linear_modules():
    with pytest.raises(ValueError, match="time_embedding.linear_1"):
        match_targets(make_tiny_unet("sd15"), ["nonexistent_proj"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inject_auto_on_half_precision_unet_and_restore_bitwise(dtype):
    unet = make_tiny_unet("sd15", dtype=dtype)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x = torch.randn(1, 4, 8, 8, dtype=dtype)
    ehs = torch.randn(1, 5, 32, dtype=dtype)
    with torch.no_grad():
        ref = unet(x, 10, ehs).sample
        n = len(inject_adapters(unet, "auto", rank=2))
        out = unet(x, 10, ehs).sample
    assert n == 48 and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2)
    remove_adapters(unet)
    after = unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
