"""comfy_nodes without ComfyUI: safe file names, key mapping, resize/blend/inspect, nodes via the stand-in API.

References are independent of the code under test: the adapters' own dense
``X − X0`` (``RiemannLinear.delta_weight``) and dense ``torch.linalg.svd``.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy_nodes
from comfy_nodes import logic, nodes
from comfy_nodes._compat import HAVE_COMFY_API
from comfy_nodes.comfy_keys import comfy_candidates, comfy_lora_from_tensors, split_comfy_key
from comfy_nodes.paths import NodeInputError, clean_relative_name, list_files, output_file, resolve_file
from comfy_nodes.spectrum import spectrum_image
from riemann_diffusion.export import load_adapter, save_adapter

try:
    from . import comfy_nodes_helpers as h
except ImportError:  # tests/ is not a package
    import comfy_nodes_helpers as h

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "examples" / "comfyui_workflow_api.json"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def unet():
    return h.trained_unet("sd15", rank=2, steps=2)


@pytest.fixture(scope="module")
def files(unet, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    save_adapter(unet, d / "ours_kohya.safetensors", metadata={"base_model": "tiny-sd15"})
    save_adapter(unet, d / "ours_peft.safetensors", format="peft")
    h.write_riemann_state(unet, d / "state.safetensors")
    h.write_peft_unet(unet, d / "diffusers_style.safetensors")
    h.write_kohya_with_alpha(unet, d / "kohya_alpha.safetensors")
    return d


@pytest.fixture(scope="module")
def key_map(unet):
    return h.fake_unet_key_map(h.linear_shapes(unet))


def _delta_from_comfy_sd(sd: dict, name: str) -> torch.Tensor:
    up, down = sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"]
    scale = float(sd[f"{name}.alpha"]) / down.shape[0] if f"{name}.alpha" in sd else 1.0
    return scale * up.double() @ down.double()


# ----------------------------------------------------------------------------- paths
@pytest.mark.parametrize("bad", ["", "  ", "../x.safetensors", "a/../../x.safetensors", "/etc/passwd",
                                 "C:\\x.safetensors", "a\\..\\..\\x.safetensors", "x\0.safetensors", ".."])
def test_unsafe_names_are_refused(bad):
    with pytest.raises(NodeInputError):
        clean_relative_name(bad)


def test_names_are_normalised():
    assert clean_relative_name("sub\\x.safetensors") == "sub/x.safetensors"
    assert clean_relative_name("./sub//x.safetensors") == "sub/x.safetensors"


def test_resolve_file_searches_folders_in_order_and_explains_failures(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (b / "sub").mkdir(parents=True)
    a.mkdir()
    (b / "sub" / "x.safetensors").write_bytes(b"x")
    (a / "y.ckpt").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    assert resolve_file("sub/x.safetensors", [a, b]) == b / "sub" / "x.safetensors"
    with pytest.raises(NodeInputError, match="safetensors only"):
        resolve_file("y.ckpt", [a, b])
    with pytest.raises(NodeInputError, match="not found in"):
        resolve_file("z.safetensors", [a, b])
    with pytest.raises(NodeInputError, match=r"\.\."):
        resolve_file("../secret.safetensors", [a])


def test_list_files_and_output_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    for p in ("b.safetensors", "sub/a.sft", "c.ckpt", ".git/d.safetensors"):
        (tmp_path / p).write_bytes(b"x")
    assert list_files([tmp_path, tmp_path / "missing"]) == ["b.safetensors", "sub/a.sft"]
    out = output_file("new/dir/name", tmp_path)
    assert out == tmp_path / "new" / "dir" / "name.safetensors" and out.parent.is_dir()
    with pytest.raises(NodeInputError, match="already exists"):
        output_file("b", tmp_path)
    assert output_file("b.safetensors", tmp_path, overwrite=True) == tmp_path / "b.safetensors"
    with pytest.raises(NodeInputError):
        output_file("../escape", tmp_path)


# ----------------------------------------------------------------------------- key mapping
@pytest.mark.parametrize("fname", ["ours_kohya.safetensors", "ours_peft.safetensors", "state.safetensors",
                                   "diffusers_style.safetensors", "kohya_alpha.safetensors"])
def test_every_layer_maps_to_comfy_names_with_the_exact_update(unet, files, key_map, fname):
    km, shapes = key_map
    result, info = logic.comfy_lora_for_file(files / fname, km, shapes.__getitem__)
    expected = h.deltas(unet)
    assert len(result.applied) == len(expected) == 48
    assert not result.unmapped and not result.bad_shapes and not result.skipped_text
    assert all(k.startswith("lora_unet_") for k in result.state_dict)
    for name, delta in expected.items():
        stem = "lora_unet_" + name.replace(".", "_")
        torch.testing.assert_close(_delta_from_comfy_sd(result.state_dict, stem), delta.double(),
                                   rtol=1e-5, atol=1e-6)
    if fname == "state.safetensors":
        assert info["format"] == "riemann"


def test_file_for_another_family_is_refused_with_shapes(files, key_map, tmp_path):
    xl = h.trained_unet("sdxl", rank=2, steps=1)
    save_adapter(xl, tmp_path / "xl.safetensors")
    km, shapes = key_map
    with pytest.raises(NodeInputError, match=r"(?s)do not match the SD15.*different base model") as err:
        logic.comfy_lora_for_file(tmp_path / "xl.safetensors", km, shapes.__getitem__, model_name="SD15")
    assert "sdxl" in str(err.value) and "×" in str(err.value)


def test_dit_file_on_a_unet_names_the_problem(key_map, tmp_path):
    sd = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 32),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 2)}
    save_file(sd, str(tmp_path / "dit.safetensors"))
    km, shapes = key_map
    with pytest.raises(NodeInputError, match="none of its 1 layers exists"):
        logic.comfy_lora_for_file(tmp_path / "dit.safetensors", km, shapes.__getitem__, model_name="SD15")


def test_strict_off_applies_what_fits(files, key_map):
    km, shapes = key_map
    names = sorted(k for k in km if "_attn" in k)
    partial = {k: v for k, v in km.items() if k not in names[:5]}
    with pytest.raises(NodeInputError, match="5 of 48 layers"):
        logic.comfy_lora_for_file(files / "ours_kohya.safetensors", partial, shapes.__getitem__)
    result, _ = logic.comfy_lora_for_file(files / "ours_kohya.safetensors", partial, shapes.__getitem__,
                                          strict=False)
    assert len(result.applied) == 43 and len(result.unmapped) == 5
    assert "5 layers not in this model" in result.summary()


def test_text_encoder_layers_need_clip(tmp_path, key_map):
    name = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    sd = {f"{name}.lora_A.weight": torch.randn(2, 32), f"{name}.lora_B.weight": torch.randn(32, 2)}
    save_file(sd, str(tmp_path / "te.safetensors"))
    km, shapes = key_map
    kohya = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    clip_km = {**km, kohya: "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"}
    clip_shapes = {**shapes, clip_km[kohya]: (32, 32)}
    # without CLIP the layer is skipped (like LoraLoaderModelOnly), not an error
    result, _ = logic.comfy_lora_for_file(tmp_path / "te.safetensors", km, shapes.__getitem__)
    assert result.skipped_text == [name] and not result.state_dict
    result, _ = logic.comfy_lora_for_file(tmp_path / "te.safetensors", clip_km, clip_shapes.__getitem__,
                                          clip_connected=True)
    assert result.applied == {name: kohya}
    assert comfy_candidates("text_encoder", "encoder.layers.0.self_attn.q_proj")[0] == kohya


def test_corrupt_and_non_finite_files(files, key_map, tmp_path):
    km, shapes = key_map
    data = (files / "ours_kohya.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NodeInputError, match="not a valid safetensors"):
        logic.comfy_lora_for_file(tmp_path / "cut.safetensors", km, shapes.__getitem__)
    sd = load_file(str(files / "ours_kohya.safetensors"))
    sd[next(k for k in sd if k.endswith("lora_up.weight"))][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(NodeInputError, match="NaN"):
        logic.comfy_lora_for_file(tmp_path / "nan.safetensors", km, shapes.__getitem__)
    with pytest.raises(NodeInputError, match="cut.safetensors"):
        logic.read_adapter(tmp_path / "cut.safetensors")


def test_other_adapter_types_pass_through_unchanged(key_map, tmp_path):
    km, shapes = key_map
    stem = next(iter(km))
    m, n = shapes[km[stem]]
    loha = {f"{stem}.hada_w1_a": torch.randn(m, 2), f"{stem}.hada_w1_b": torch.randn(2, n),
            f"{stem}.hada_w2_a": torch.randn(m, 2), f"{stem}.hada_w2_b": torch.randn(2, n),
            f"{stem}.alpha": torch.tensor(2.0)}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    result, info = logic.comfy_lora_for_file(tmp_path / "loha.safetensors", km, shapes.__getitem__)
    assert set(result.state_dict) == set(loha) and info["format"].startswith("other")
    assert split_comfy_key(f"{stem}.hada_w1_a") == (stem, ".hada_w1_a")
    # a plain pair with wrong shapes in the pass-through path is caught too
    bad = {f"{stem}.lora_up.weight": torch.randn(m + 1, 2), f"{stem}.lora_down.weight": torch.randn(2, n),
           f"{stem}.hada_t1": torch.randn(1)}
    with pytest.raises(NodeInputError, match="shapes do not match"):
        comfy_lora_from_tensors(bad, km, shapes.__getitem__)
    with pytest.raises(NodeInputError, match="only its up tensor"):
        comfy_lora_from_tensors({f"{stem}.lora_up.weight": torch.randn(m, 2), f"{stem}.hada_t1": torch.randn(1)},
                                km, shapes.__getitem__)


# ----------------------------------------------------------------------------- inspect / resize / blend
def test_singular_values_and_summary(unet, files):
    lora = load_adapter(files / "ours_kohya.safetensors")
    name = next(iter(lora.layers))
    layer = lora.layers[name]
    dense = torch.linalg.svdvals(layer.delta().double())[: layer.rank]
    torch.testing.assert_close(logic.singular_values(layer.up, layer.down, layer.scale), dense,
                               rtol=1e-6, atol=1e-9)
    summary = logic.summarize(lora, "ours_kohya.safetensors")
    assert summary.rank == 4 and summary.num_layers == 48 and summary.family == "sd15"
    assert summary.targets == ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v",
                               "attn2.to_k", "attn2.to_out.0", "attn2.to_q", "attn2.to_v"]
    assert summary.provenance["base_model"] == "tiny-sd15"
    assert "rank 4" in summary.text() and "tiny-sd15" in summary.text()


def test_spectrum_image_is_a_comfy_image(files):
    lora = load_adapter(files / "ours_kohya.safetensors")
    groups = logic.spectrum_groups(lora)
    assert len(groups) == 8 and sum(len(v) for v in groups.values()) == 48
    img = spectrum_image(groups, title="t", width=512)
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[2] == 512 and img.shape[3] == 3
    assert img.dtype == torch.float32 and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert float(img.std()) > 0.01  # something was drawn
    assert spectrum_image({}, width=256).shape[2] == 256


def test_resize_is_the_best_rank_k_approximation(unet, files, tmp_path):
    path, rel, info = logic.resize_file(files / "ours_kohya.safetensors", 1, tmp_path / "r1.safetensors")
    assert info == {"rank": 1, "layers": 48, "format": "kohya"}
    resized = load_adapter(path)
    kept, total = 0.0, 0.0
    for name, delta in h.deltas(unet).items():
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        best = S[0] * torch.outer(U[:, 0], Vh[0])
        torch.testing.assert_close(resized.delta(f"unet.{name}").double(), best, rtol=1e-4, atol=1e-6)
        kept, total = kept + float((S[1:] ** 2).sum()), total + float((S ** 2).sum())
    assert rel == pytest.approx((kept / total) ** 0.5, rel=1e-4)
    assert resized.metadata["derived_from"] == "ours_kohya.safetensors"
    with pytest.raises(NodeInputError, match="to rank 9"):
        logic.resize_file(files / "ours_kohya.safetensors", 9, tmp_path / "r9.safetensors")


def test_blend_is_exact_and_ranks_add(unet, files, tmp_path):
    other = h.trained_unet("sd15", rank=2, steps=2, seed=1)
    save_adapter(other, tmp_path / "b.safetensors")
    path, info = logic.blend_files(files / "ours_kohya.safetensors", tmp_path / "b.safetensors", 0.7, -0.3,
                                   tmp_path / "ab.safetensors")
    assert info["rank"] == 8 and info["shared_layers"] == 48
    blended = load_adapter(path)
    da, db = h.deltas(unet), h.deltas(other)
    for name in da:
        torch.testing.assert_close(blended.delta(f"unet.{name}").double(),
                                   0.7 * da[name].double() - 0.3 * db[name].double(), rtol=1e-4, atol=1e-6)
    xl = h.trained_unet("sdxl", rank=2, steps=1)
    save_adapter(xl, tmp_path / "xl.safetensors")
    with pytest.raises(NodeInputError, match="cannot blend"):
        logic.blend_files(files / "ours_kohya.safetensors", tmp_path / "xl.safetensors", 1, 1,
                          tmp_path / "bad.safetensors")


# ----------------------------------------------------------------------------- nodes (stand-in API)
def test_pack_exports_and_v1_view():
    assert set(comfy_nodes.NODE_CLASS_MAPPINGS) == {"RiemannLoraLoader", "RiemannLoraInspect", "RiemannLoraResize",
                                                    "RiemannLoraBlend", "RiemannLoraTrain"}
    assert set(comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(comfy_nodes.NODE_CLASS_MAPPINGS)
    for node_id, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items():
        schema = cls.define_schema()
        assert schema.node_id == node_id and schema.display_name == comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        ids = [i.id for i in schema.inputs]
        assert len(ids) == len(set(ids))
        assert set(cls.INPUT_TYPES()["required"]) | set(cls.INPUT_TYPES().get("optional", {})) == set(ids)
    loader = comfy_nodes.NODE_CLASS_MAPPINGS["RiemannLoraLoader"]
    assert tuple(loader.RETURN_TYPES) == ("MODEL", "CLIP", "STRING")
    assert "clip" in loader.INPUT_TYPES()["optional"]


def test_repo_root_init_loads_like_a_custom_node_folder():
    # ComfyUI imports custom_nodes/<clone>/__init__.py by file location, as a package.
    spec = importlib.util.spec_from_file_location("rd_clone_probe", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["rd_clone_probe"] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == set(comfy_nodes.NODE_CLASS_MAPPINGS)
        assert callable(module.comfy_entrypoint)
    finally:
        for name in [n for n in sys.modules if n == "rd_clone_probe" or n.startswith("rd_clone_probe.")]:
            del sys.modules[name]


@pytest.fixture
def loras_dir(tmp_path, monkeypatch, files):
    d = tmp_path / "loras"
    d.mkdir()
    for f in ("ours_kohya.safetensors", "state.safetensors"):
        (d / f).write_bytes((files / f).read_bytes())
    monkeypatch.setattr(nodes, "_folders", lambda kind: [str(d)] if kind == "loras" else [])
    return d


def test_inspect_resize_blend_nodes_execute(loras_dir):
    report, image, rank = comfy_nodes.NODE_CLASS_MAPPINGS["RiemannLoraInspect"].execute(
        lora_name="ours_kohya.safetensors", image_width=384).result
    assert rank == 4 and "sd15" in report and image.shape[0] == 1 and image.shape[2] == 384
    if not HAVE_COMFY_API:  # the stand-in's V1 call, as an old ComfyUI without comfy_api makes it
        inspect = comfy_nodes.NODE_CLASS_MAPPINGS["RiemannLoraInspect"]
        v1 = getattr(inspect(), inspect.FUNCTION)(lora_name="ours_kohya.safetensors", image_width=256)
        assert len(v1) == 3 and v1[0] == report and v1[1].shape[2] == 256
    info, rel = comfy_nodes.NODE_CLASS_MAPPINGS["RiemannLoraResize"].execute(
        lora_name="ours_kohya.safetensors", rank=2, output_name="small/r2").result
    assert (loras_dir / "small" / "r2.safetensors").is_file() and "small/r2.safetensors" in info and 0 < rel < 1
    with pytest.raises(NodeInputError, match="already exists"):
        comfy_nodes.NODE_CLASS_MAPPINGS["RiemannLoraResize"].execute(
            lora_name="ours_kohya.safetensors", rank=2, output_name="small/r2")
    (info,) = comfy_nodes.NODE_CLASS_MAPPINGS["RiemannLoraBlend"].execute(
        lora_a="ours_kohya.safetensors", lora_b="state.safetensors", weight_a=1.0, weight_b=-1.0,
        output_name="zero", format="peft").result
    zero = load_adapter(loras_dir / "zero.safetensors")
    assert zero.format == "peft" and "rank" in info
    assert max(float(layer.delta().abs().max()) for layer in zero.layers.values()) < 1e-5  # A − A = 0
    with pytest.raises(NodeInputError, match=r"\.\."):
        comfy_nodes.NODE_CLASS_MAPPINGS["RiemannLoraInspect"].execute(lora_name="../files/x.safetensors")


@pytest.mark.slow
def test_train_subject_writes_a_lora_and_reports_progress(tmp_path):
    calls = []
    info = logic.train_subject("tiny", None, "a photo of sks toy", 2, 2, tmp_path / "t.safetensors",
                               tmp_path / "work", progress=lambda s, t, loss, lr: calls.append((s, t)))
    assert calls == [(1, 2), (2, 2)] and not info["cancelled"] and info["path"] == tmp_path / "t.safetensors"
    lora = load_adapter(info["path"])
    assert lora.family == "sd15" and lora.rank == 4 and lora.metadata["optimizer"]["name"] == "Riemannion"
    assert logic.image_file_tensor(info["loss_plot"]).shape[-1] == 3
    stopped = logic.train_subject("tiny", None, "", 5, 2, tmp_path / "s.safetensors", tmp_path / "work2",
                                  progress=lambda s, t, loss, lr: s < 1)
    assert stopped["cancelled"] and stopped["path"] is None and not (tmp_path / "s.safetensors").exists()


# ----------------------------------------------------------------------------- example workflow
# Output counts of the ComfyUI core nodes the example uses (nodes.py of ComfyUI).
CORE_OUTPUTS = {"CheckpointLoaderSimple": 3, "CLIPTextEncode": 1, "EmptyLatentImage": 1, "KSampler": 1,
                "VAEDecode": 1, "SaveImage": 0, "PreviewImage": 0}


def test_example_workflow_is_valid_api_format():
    wf = json.loads(WORKFLOW.read_text())
    ours = comfy_nodes.NODE_CLASS_MAPPINGS
    used = {node["class_type"] for node in wf.values()}
    assert {"RiemannLoraLoader", "RiemannLoraInspect", "CheckpointLoaderSimple", "CLIPTextEncode", "KSampler",
            "VAEDecode", "SaveImage"} <= used
    for node_id, node in wf.items():
        cls = node["class_type"]
        assert cls in ours or cls in CORE_OUTPUTS, f"unknown node class {cls}"
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link: [source node id, output index]
                src, index = value
                assert src in wf, f"node {node_id} input {name} links to missing node {src}"
                src_cls = wf[src]["class_type"]
                n_out = len(ours[src_cls].RETURN_TYPES) if src_cls in ours else CORE_OUTPUTS[src_cls]
                assert 0 <= index < n_out, f"node {node_id} input {name}: {src_cls} has no output {index}"
        if cls in ours:
            spec = ours[cls].INPUT_TYPES()
            assert set(spec["required"]) <= set(node["inputs"]), f"{cls} lacks required inputs"
            assert set(node["inputs"]) <= set(spec["required"]) | set(spec.get("optional", {}))
