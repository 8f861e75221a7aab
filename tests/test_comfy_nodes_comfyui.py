"""The Riemann node pack inside a real ComfyUI (opt-in: ``COMFYUI_PATH=/path/to/ComfyUI pytest -m comfyui``).

The pack is loaded by ComfyUI's own custom-node loader (``nodes.load_custom_node``)
from ``comfy_nodes/`` and from the repository root (a ``git clone`` in
``custom_nodes/``). Nodes run through ComfyUI's execution entry points
(``PREPARE_CLASS_CLONE`` + ``EXECUTE_NORMALIZED``); LoRAs are applied by ComfyUI's
own patcher, and patched weights are read back with ComfyUI's
``patch_weight_to_device``. References: each adapter's own ``X − X0``.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import torch

try:
    from . import comfy_nodes_helpers as h
    from . import comfy_support as cs
except ImportError:  # tests/ is not a package
    import comfy_nodes_helpers as h
    import comfy_support as cs

from riemann_diffusion import remove_adapters
from riemann_diffusion.export import LoraFile, LoraLayer, load_adapter, save_adapter, write_lora

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout"),
]

REPO = Path(__file__).resolve().parents[1]
NODE_IDS = {"RiemannLoraLoader", "RiemannLoraInspect", "RiemannLoraResize", "RiemannLoraBlend", "RiemannLoraTrain"}


@pytest.fixture(scope="module")
def comfy():
    return cs.import_comfy(os.environ["COMFYUI_PATH"])


@pytest.fixture(scope="module")
def pack(comfy):
    added = cs.comfy_load_custom_node(REPO / "comfy_nodes")
    assert set(added) == NODE_IDS
    return added


@pytest.fixture
def loras(comfy, tmp_path, monkeypatch):
    fp = comfy.folder_paths
    d = tmp_path / "loras"
    d.mkdir()
    monkeypatch.setitem(fp.folder_names_and_paths, "loras", ([str(d)], fp.supported_pt_extensions))
    monkeypatch.setattr(fp, "filename_list_cache", {})
    return d


def run_node(cls, **inputs):
    """What ComfyUI's executor does: a class clone with hidden inputs, then EXECUTE_NORMALIZED."""
    return cls.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(**inputs).result


@pytest.fixture(scope="module")
def trained():
    """A tiny SD1.5 UNet with rank-2 adapters after 2 Riemannion steps (X ≠ X0)."""
    return h.trained_unet("sd15", rank=2, steps=2)


# ----------------------------------------------------------------------------- loading the pack
def test_pack_loads_through_comfyui_custom_node_loader(comfy, pack):
    from comfy_api.latest import ComfyExtension, io

    for node_id, cls in pack.items():
        assert issubclass(cls, io.ComfyNode)  # the real V3 API, not the stand-in
        assert cls.GET_SCHEMA().node_id == node_id
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Riemann LoRA")
        assert cls.INPUT_TYPES()["required"]
    module = sys.modules[str(REPO / "comfy_nodes").replace(".", "_x_")]
    extension = asyncio.run(module.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    assert {c.GET_SCHEMA().node_id for c in asyncio.run(extension.get_node_list())} == NODE_IDS


def test_repository_clone_in_custom_nodes_loads(comfy, pack):
    added = cs.comfy_load_custom_node(REPO)  # custom_nodes/<clone>/__init__.py
    assert set(added) == NODE_IDS


# ----------------------------------------------------------------------------- Loader: keys (meta, full size)
def test_loader_turns_every_key_into_a_patch_on_full_size_sd15_meta(comfy, pack, loras):
    from diffusers import UNet2DConditionModel

    from riemann_diffusion.tiny import sd15_full_unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_full_unet_config())
    model = cs.as_patcher(cs.comfy_model_from_diffusers_unet(unet.state_dict(), device="meta"))
    clip = cs.comfy_clip("sd1", device="meta")
    assert type(model.model.model_config).__name__ == "SD15"
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(tuple(h.ATTN)):
            layers[f"unet.{name}"] = LoraLayer(torch.randn(m.out_features, 4, generator=g),
                                               torch.randn(4, m.in_features, generator=g), 0.5)
    for i in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layers[f"text_encoder.text_model.encoder.layers.{i}.self_attn.{proj}"] = LoraLayer(
                torch.randn(768, 4, generator=g), torch.randn(4, 768, generator=g), 1.0)
    write_lora(LoraFile(layers=layers, family="sd15"), loras / "full.safetensors")

    with cs.capture_comfy_warnings() as messages:
        new_model, new_clip, info = run_node(pack["RiemannLoraLoader"], model=model, clip=clip,
                                             lora_name="full.safetensors", strength_model=1.0, strength_clip=1.0,
                                             strict=True)

    assert [m for m in messages if "not loaded" in m.lower()] == []
    key_map = cs.comfy_key_map(model, clip)
    unet_keys = {key_map["lora_unet_" + n[len("unet."):].replace(".", "_")] for n in layers if n.startswith("unet.")}
    clip_keys = {key_map["lora_te_" + n[len("text_encoder."):].replace(".", "_")]
                 for n in layers if n.startswith("text_encoder.")}
    assert len(unet_keys) == 128 and len(clip_keys) == 48
    assert set(new_model.patches) == unet_keys
    assert set(new_clip.patcher.patches) == clip_keys
    assert model.patches == {} and clip.patcher.patches == {}  # clones were patched, not the inputs
    assert "applied 176 layers" in info


# ----------------------------------------------------------------------------- Loader: values (tiny, real)
def _comfy_model(unet):
    """ComfyUI model of the base weights (adapters removed from a copy)."""
    import copy

    base = copy.deepcopy(unet)
    remove_adapters(base)
    return cs.as_patcher(cs.comfy_model_from_diffusers_unet(base.state_dict()))


@pytest.mark.parametrize("kind", ["kohya", "peft", "riemann_state", "diffusers_unet_names", "kohya_alpha"])
def test_loader_patches_w0_plus_strength_times_update(comfy, pack, loras, trained, kind):
    path = loras / f"{kind}.safetensors"
    if kind in ("kohya", "peft"):
        save_adapter(trained, path, format=kind)
    elif kind == "riemann_state":
        h.write_riemann_state(trained, path)
    elif kind == "kohya_alpha":  # scale alpha/R = 0.25 folded in by the loader
        h.write_kohya_with_alpha(trained, path)
    else:
        h.write_peft_unet(trained, path)
    model = _comfy_model(trained)
    deltas, weights = h.deltas(trained), h.base_weights(trained)
    key_map = cs.comfy_key_map(model)

    with cs.capture_comfy_warnings() as messages:
        patched, _, info = run_node(pack["RiemannLoraLoader"], model=model, lora_name=path.name,
                                    strength_model=0.7, strength_clip=1.0, strict=True)

    assert [m for m in messages if "not loaded" in m.lower()] == []
    assert len(patched.patches) == len(deltas) == 48
    for name, delta in deltas.items():
        key = key_map["lora_unet_" + name.replace(".", "_")]
        torch.testing.assert_close(cs.comfy_patched_weight(patched, key), weights[name] + 0.7 * delta,
                                   rtol=1e-5, atol=1e-6)
    if kind == "diffusers_unet_names":
        # ComfyUI's own loader silently drops the attention layers of this naming
        _, not_loaded = cs.comfy_load_lora(model, load_file_dict(path))
        assert len(not_loaded) == 2 * 48


def load_file_dict(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_loader_composes_with_comfyui_lora_loader(comfy, pack, loras, trained):
    other = h.trained_unet("sd15", rank=2, steps=2, seed=3)
    save_adapter(trained, loras / "a.safetensors")
    save_adapter(other, loras / "b.safetensors")
    model = _comfy_model(trained)
    patched, _, _ = run_node(pack["RiemannLoraLoader"], model=model, lora_name="a.safetensors",
                             strength_model=0.7, strength_clip=1.0, strict=True)
    (both,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(patched, "b.safetensors", -0.5)
    key_map = cs.comfy_key_map(model)
    da, db, w = h.deltas(trained), h.deltas(other), h.base_weights(trained)
    for name in list(da)[:8]:
        key = key_map["lora_unet_" + name.replace(".", "_")]
        assert len(both.patches[key]) == 2
        torch.testing.assert_close(cs.comfy_patched_weight(both, key), w[name] + 0.7 * da[name] - 0.5 * db[name],
                                   rtol=1e-5, atol=1e-6)


def test_loader_refuses_a_file_for_another_model(comfy, pack, loras, trained):
    xl = h.trained_unet("sdxl", rank=2, steps=1)
    save_adapter(xl, loras / "xl.safetensors")
    (loras / "cut.safetensors").write_bytes((loras / "xl.safetensors").read_bytes()[:100])
    model = _comfy_model(trained)
    with pytest.raises(ValueError, match=r"(?s)SD15.*sdxl.*different base model"):
        run_node(pack["RiemannLoraLoader"], model=model, lora_name="xl.safetensors", strength_model=1.0,
                 strength_clip=1.0, strict=True)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        run_node(pack["RiemannLoraLoader"], model=model, lora_name="cut.safetensors", strength_model=1.0,
                 strength_clip=1.0, strict=True)
    with pytest.raises(ValueError, match=r"\.\."):
        run_node(pack["RiemannLoraLoader"], model=model, lora_name="../loras/xl.safetensors", strength_model=1.0,
                 strength_clip=1.0, strict=True)


# ----------------------------------------------------------------------------- Inspect / Resize / Blend
def test_inspect_resize_blend_in_comfyui(comfy, pack, loras, trained):
    save_adapter(trained, loras / "a.safetensors")
    report, image, rank = run_node(pack["RiemannLoraInspect"], lora_name="a.safetensors", image_width=512)
    assert rank == 4 and "sd15" in report and tuple(image.shape[::3]) == (1, 3) and image.shape[2] == 512

    info, rel = run_node(pack["RiemannLoraResize"], lora_name="a.safetensors", rank=2, output_name="r2",
                         format="same", overwrite=False)
    assert "r2.safetensors" in info and 0 < rel < 1
    assert "r2.safetensors" in comfy.folder_paths.get_filename_list("loras")  # shows up in the dropdowns
    model = _comfy_model(trained)
    patched, not_loaded = cs.comfy_load_lora(model, load_file_dict(loras / "r2.safetensors"), strength=1.0)
    assert not_loaded == [] and len(patched.patches) == 48  # ComfyUI's own loader takes our resized file
    resized, w = load_adapter(loras / "r2.safetensors"), h.base_weights(trained)
    key_map = cs.comfy_key_map(model)
    name = next(iter(w))
    torch.testing.assert_close(cs.comfy_patched_weight(patched, key_map["lora_unet_" + name.replace(".", "_")]),
                               w[name] + resized.delta(f"unet.{name}"), rtol=1e-5, atol=1e-6)

    (info,) = run_node(pack["RiemannLoraBlend"], lora_a="a.safetensors", lora_b="r2.safetensors", weight_a=1.0,
                       weight_b=0.5, output_name="mix/ab", format="same", overwrite=False)
    assert (loras / "mix" / "ab.safetensors").is_file() and "rank 6" in info


# ----------------------------------------------------------------------------- example workflow
def test_example_workflow_validates_in_comfyui(comfy, pack, loras, tmp_path, monkeypatch):
    """ComfyUI's own prompt validation accepts the example; every link joins matching types."""
    execution = cs._import_with_stubs("execution")
    fp = comfy.folder_paths
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "v1-5-pruned-emaonly.safetensors").write_bytes(b"")
    (loras / "riemann").mkdir()
    (loras / "riemann" / "subject.safetensors").write_bytes(b"")
    monkeypatch.setitem(fp.folder_names_and_paths, "checkpoints", ([str(ckpts)], fp.supported_pt_extensions))
    wf = json.loads((REPO / "examples" / "comfyui_workflow_api.json").read_text())

    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", wf, None))

    assert ok and error is None and node_errors == {}, node_errors
    assert sorted(outputs) == ["10", "8"]
    classes = comfy.nodes.NODE_CLASS_MAPPINGS
    for node in wf.values():
        spec = classes[node["class_type"]].INPUT_TYPES()
        spec = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                src = classes[wf[value[0]]["class_type"]]
                assert src.RETURN_TYPES[value[1]] == spec[name][0], (node["class_type"], name)


# ----------------------------------------------------------------------------- Train
@pytest.mark.slow
def test_train_node_reports_progress_and_its_lora_loads(comfy, pack, loras):
    calls = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        info, curve = run_node(pack["RiemannLoraTrain"], base_model="tiny", images_folder="",
                               prompt="a photo of sks toy", steps=2, rank=2, learning_rate=0.0, rule="heavy_ball", seed=0,
                               output_name="trained/sks", overwrite=False)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert calls == [(1, 2), (2, 2)]
    assert (loras / "trained" / "sks.safetensors").is_file() and "2 steps" in info
    assert curve.ndim == 4 and curve.shape[-1] == 3
    from riemann_diffusion.tiny import make_tiny_unet

    model = cs.as_patcher(cs.comfy_model_from_diffusers_unet(make_tiny_unet("sd15", seed=0).state_dict()))
    with cs.capture_comfy_warnings() as messages:
        patched, _, _ = run_node(pack["RiemannLoraLoader"], model=model, lora_name="trained/sks.safetensors",
                                 strength_model=1.0, strength_clip=1.0, strict=True)
    n_layers = len(load_adapter(loras / "trained" / "sks.safetensors").layers)
    assert not [m for m in messages if "not loaded" in m.lower()] and len(patched.patches) == n_layers > 0
    with pytest.raises(ValueError, match="not found"):
        run_node(pack["RiemannLoraTrain"], base_model="no-such-model", images_folder="", prompt="x", steps=1, rank=1,
                 learning_rate=0.0, rule="heavy_ball", seed=0, output_name="x", overwrite=False)


# ----------------------------------------------------------------------------- Loader on DiTs (fused q/k/v)
def _tiny_dit(kind):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if kind == "sd3":  # ComfyUI derives SD3 depth from hidden // 64: head dim must be 64
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                                     num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                                     pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 4, 8))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_loader_on_dits_patches_fused_qkv_slices(comfy, pack, loras, kind):
    transformer = _tiny_dit(kind)
    suffixes = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out") + (("proj_out",) if kind == "flux" else ())
    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, m in transformer.named_modules():
        if (isinstance(m, torch.nn.Linear) and name.endswith(suffixes)
                and name.startswith(("transformer_blocks.", "single_transformer_blocks."))):
            layers[f"transformer.{name}"] = LoraLayer(torch.randn(m.out_features, 3, generator=g) * 0.1,
                                                      torch.randn(3, m.in_features, generator=g) * 0.1, 1.0)
    lora = LoraFile(layers=layers, family=kind)
    write_lora(lora, loras / f"{kind}.safetensors")  # auto: PEFT names for DiTs
    model = cs.as_patcher(cs.comfy_model_from_diffusers_transformer(transformer.state_dict()))
    key_map = cs.comfy_key_map(model)

    with cs.capture_comfy_warnings() as messages:
        patched, _, info = run_node(pack["RiemannLoraLoader"], model=model, lora_name=f"{kind}.safetensors",
                                    strength_model=0.5, strength_clip=1.0, strict=True)

    assert [m for m in messages if "not loaded" in m.lower()] == []
    assert f"applied {len(layers)} layers" in info
    for name, layer in layers.items():
        module = transformer.get_submodule(name[len("transformer."):])
        expected = module.weight.detach() + 0.5 * layer.delta()
        torch.testing.assert_close(cs.comfy_patched_weight(patched, key_map[name]), expected, rtol=1e-5, atol=1e-5)
