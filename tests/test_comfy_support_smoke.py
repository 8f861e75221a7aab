"""Smoke tests for tests/comfy_support.py against a real ComfyUI checkout.

Opt-in: run with ``COMFYUI_PATH=/path/to/ComfyUI pytest -m comfyui``.
They check the file grammar from DESIGN.md section 8 against ComfyUI's own
loader: kohya names load completely with scale alpha/R, PEFT-style attention
keys are ignored for SD UNets, diffusers ``transformer.`` keys load for SD3/Flux.
"""
import os

import pytest
import torch

try:
    from . import comfy_support as cs
except ImportError:  # tests/ is not a package
    import comfy_support as cs

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout"),
]

ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def comfy():
    return cs.import_comfy(os.environ["COMFYUI_PATH"])


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    ).eval()


def _linear_targets(module, suffixes):
    return {name: m for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes)}


def _kohya_lora(targets, rank=4, alpha=2.0, seed=1):
    """Hand-written kohya file: lora_unet_<path with . -> _>.{lora_down,lora_up}.weight + .alpha."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for name, layer in targets.items():
        key = "lora_unet_" + name.replace(".", "_")
        down = torch.randn(rank, layer.in_features, generator=g) * 0.1
        up = torch.randn(layer.out_features, rank, generator=g) * 0.1
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(alpha)
        deltas[name] = (alpha / rank) * up @ down
    return sd, deltas


def test_import_comfy_stubs_only_missing_packages(comfy):
    for name in comfy.stubbed:
        root = name.split(".")[0]
        assert root in cs.STUBBABLE_ROOTS
    assert callable(comfy.lora.model_lora_keys_unet)
    assert comfy.model_management.get_torch_device() == torch.device("cpu")


def test_kohya_lora_on_tiny_unet_loads_fully_with_alpha_over_rank(comfy, tiny_unet):
    targets = _linear_targets(tiny_unet, ATTN_TARGETS)
    assert len(targets) == 48
    lora, deltas = _kohya_lora(targets, rank=4, alpha=2.0)
    model = cs.comfy_model_from_diffusers_unet(tiny_unet.state_dict())
    key_map = cs.comfy_key_map(model)

    patcher, not_loaded = cs.comfy_load_lora(model, lora, strength=0.7)

    assert not_loaded == []
    assert len(patcher.patches) == len(targets)
    for name, layer in targets.items():
        model_key = key_map["lora_unet_" + name.replace(".", "_")]
        expected = layer.weight.detach() + 0.7 * deltas[name]
        patched = cs.comfy_patched_weight(patcher, model_key)
        torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-6)
        # the helper restores the weight: the base model is untouched
        torch.testing.assert_close(comfy.utils.get_attr(model, model_key), layer.weight.detach())


def test_peft_style_unet_attention_keys_are_ignored(comfy, tiny_unet):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = tiny_unet.get_submodule(name)
    lora = {f"unet.{name}.lora_A.weight": torch.randn(2, layer.in_features),
            f"unet.{name}.lora_B.weight": torch.randn(layer.out_features, 2)}
    model = cs.comfy_model_from_diffusers_unet(tiny_unet.state_dict())

    patcher, not_loaded = cs.comfy_load_lora(model, lora)

    assert sorted(not_loaded) == sorted(lora)
    assert patcher.patches == {}


def test_lora_file_through_loraloader_node(comfy, tiny_unet, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    folder_paths = comfy.folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(tmp_path)], folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    targets = _linear_targets(tiny_unet, ATTN_TARGETS)
    lora, deltas = _kohya_lora(targets, rank=2, alpha=1.0)
    save_file(lora, str(tmp_path / "tiny.safetensors"), metadata={"riemann_diffusion": "{}"})
    assert folder_paths.get_filename_list("loras") == ["tiny.safetensors"]

    model = cs.as_patcher(cs.comfy_model_from_diffusers_unet(tiny_unet.state_dict()))
    with cs.capture_comfy_warnings() as messages:
        (patched_model,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, "tiny.safetensors", 1.0)

    assert not [m for m in messages if "not loaded" in m.lower()]
    name = next(iter(targets))
    model_key = cs.comfy_key_map(model)["lora_unet_" + name.replace(".", "_")]
    torch.testing.assert_close(cs.comfy_patched_weight(patched_model, model_key),
                               targets[name].weight.detach() + deltas[name], rtol=1e-5, atol=1e-6)


def test_sd1_text_encoder_kohya_names(comfy):
    clip = cs.comfy_clip("sd1", device="meta")
    key_map = cs.comfy_key_map(None, clip)
    for prefix in ("lora_te_", "lora_te1_"):
        key = prefix + "text_model_encoder_layers_0_self_attn_q_proj"
        assert key_map[key] == "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    lora = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 768),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 2),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0)}
    clip_patched, not_loaded = cs.comfy_load_lora(None, lora, clip=clip)
    assert not_loaded == []
    assert len(clip_patched.patcher.patches) == 1


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    # ComfyUI derives SD3 depth from hidden // 64: head dim must be 64.
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                                 attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=128, pooled_projection_dim=32, out_channels=16,
                                 pos_embed_max_size=16)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 4, 8))


SD3_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
FLUX_TARGETS = SD3_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_out")


@pytest.mark.parametrize("build,suffixes", [(_tiny_sd3, SD3_TARGETS), (_tiny_flux, FLUX_TARGETS)],
                         ids=["sd3", "flux"])
def test_diffusers_transformer_keys_load_for_dits(comfy, build, suffixes):
    torch.manual_seed(0)
    transformer = build()
    targets = {n: m for n, m in _linear_targets(transformer, suffixes).items()
               if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    g = torch.Generator().manual_seed(2)
    lora, deltas = {}, {}
    for name, layer in targets.items():
        A = torch.randn(2, layer.in_features, generator=g) * 0.1
        B = torch.randn(layer.out_features, 2, generator=g) * 0.1
        lora[f"transformer.{name}.lora_A.weight"], lora[f"transformer.{name}.lora_B.weight"] = A, B
        deltas[name] = B @ A  # no .alpha key: scale 1, as in diffusers
    model = cs.comfy_model_from_diffusers_transformer(transformer.state_dict())
    key_map = cs.comfy_key_map(model)

    patcher, not_loaded = cs.comfy_load_lora(model, lora, strength=1.0)

    assert not_loaded == []
    for name, layer in targets.items():
        target = key_map[f"transformer.{name}"]  # str, or (fused key, (dim, start, length)) for q/k/v
        expected = layer.weight.detach() + deltas[name]
        torch.testing.assert_close(cs.comfy_patched_weight(patcher, target), expected, rtol=1e-5, atol=1e-5)


def test_v3_custom_node_pack_loads_and_runs(comfy, tmp_path):
    pack = tmp_path / "rd_smoke_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(
        "from comfy_api.latest import ComfyExtension, io\n"
        "from .impl import Halve\n"
        "class Ext(ComfyExtension):\n"
        "    async def get_node_list(self):\n"
        "        return [Halve]\n"
        "async def comfy_entrypoint():\n"
        "    return Ext()\n")
    (pack / "impl.py").write_text(
        "from comfy_api.latest import io\n"
        "class Halve(io.ComfyNode):\n"
        "    @classmethod\n"
        "    def define_schema(cls):\n"
        "        return io.Schema(node_id='RDSmoke_Halve', display_name='Halve', category='testing',\n"
        "                         inputs=[io.Float.Input('x', default=1.0, min=-10.0, max=10.0)],\n"
        "                         outputs=[io.Float.Output(display_name='y')])\n"
        "    @classmethod\n"
        "    def execute(cls, x):\n"
        "        return io.NodeOutput(x / 2)\n")

    added = cs.comfy_load_custom_node(pack)

    assert list(added) == ["RDSmoke_Halve"]
    node = added["RDSmoke_Halve"]
    assert node.INPUT_TYPES()["required"]["x"][0] == "FLOAT"
    assert node.RETURN_TYPES == ["FLOAT"]
    assert node.EXECUTE_NORMALIZED(x=3.0).result == (1.5,)
