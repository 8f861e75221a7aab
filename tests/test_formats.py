"""Key grammars: kohya and PEFT names, both ways, and the kohya conformance of UNet exports."""
import re

import pytest

from riemann_diffusion import formats
from riemann_diffusion.tiny import make_tiny_pipeline

NAME_CASES = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "sd15",
     "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "sdxl",
     "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"),
    ("unet", "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.0.proj", "sd15",
     "lora_unet_up_blocks_0_attentions_2_transformer_blocks_1_ff_net_0_proj"),
    ("unet", "down_blocks.0.resnets.1.time_emb_proj", "sd15", "lora_unet_down_blocks_0_resnets_1_time_emb_proj"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", "sd15",
     "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    ("text_encoder", "text_model.encoder.layers.11.self_attn.out_proj", "sdxl",
     "lora_te1_text_model_encoder_layers_11_self_attn_out_proj"),
    ("text_encoder_2", "encoder.layers.3.mlp.fc1", "sdxl", "lora_te2_text_model_encoder_layers_3_mlp_fc1"),
]


@pytest.mark.parametrize("component,module,family,expected", NAME_CASES)
def test_kohya_names_round_trip(component, module, family, expected):
    name = formats.kohya_name(component, module, family)
    assert name == expected
    assert formats.KOHYA_KEY_RE.match(name + ".lora_down.weight")
    assert formats.kohya_to_module(name) == (component, formats.file_module_path(component, module))


@pytest.mark.parametrize("name,expected", [
    ("lora_unet_single_transformer_blocks_0_attn_to_q", "single_transformer_blocks.0.attn.to_q"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_time_embedding_linear_1", "time_embedding.linear_1"),
])
def test_kohya_vocabulary_rebuilds_paths(name, expected):
    assert formats.kohya_to_module(name)[1] == expected


def test_kohya_to_module_exact_against_model_names():
    names = ["a_b.c", "a.b_c"]  # both give lora_unet_a_b_c: only the model can tell
    with pytest.raises(KeyError, match="matches no module"):
        formats.kohya_to_module("lora_unet_x_y", names)
    assert formats.kohya_to_module("lora_unet_a_b_c", ["a_b.c"]) == ("unet", "a_b.c")


def test_kohya_refuses_dit_components():
    with pytest.raises(ValueError, match="peft"):
        formats.kohya_prefix("transformer", "flux")
    with pytest.raises(ValueError):
        formats.kohya_prefix("text_encoder_2", "sd15")


def test_peft_names_and_parse_key():
    assert formats.peft_name("text_encoder", "encoder.layers.0.self_attn.q_proj") == \
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert formats.peft_name("transformer", "single_transformer_blocks.0.proj_out") == \
        "transformer.single_transformer_blocks.0.proj_out"
    assert formats.parse_key("transformer.transformer_blocks.0.attn.to_q.lora_A.weight") == \
        ("peft", "transformer", "transformer_blocks.0.attn.to_q", "down")
    assert formats.parse_key("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha") == \
        ("kohya", "text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj", "alpha")
    assert formats.parse_key("lora_unet_x.hada_w1_a") is None
    assert formats.parse_key("unet.x.lora.down.weight") is None


def test_model_module_path_handles_flattened_clip():
    names = ["encoder.layers.0.self_attn.q_proj"]
    assert formats.model_module_path("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", names) == names[0]
    assert formats.model_module_path("unet", "text_model.encoder.layers.0.self_attn.q_proj", names) is None


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_every_unet_linear_has_an_unambiguous_kohya_name(kind):
    """ComfyUI maps ``lora_unet_`` + the diffusers weight key with dots as underscores;
    the name must come back to exactly one Linear module."""
    unet = make_tiny_pipeline(kind).unet
    linears = [n for n, m in unet.named_modules() if type(m).__name__ == "Linear"]
    comfy_names = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in unet.state_dict()
                   if k.endswith(".weight")}
    seen = set()
    for n in linears:
        name = formats.kohya_name("unet", n, kind)
        assert re.fullmatch(r"lora_unet_[A-Za-z0-9_]+", name) and name in comfy_names
        assert formats.kohya_to_module(name, linears) == ("unet", n)
        seen.add(name)
    assert len(seen) == len(linears)
