"""save_adapter / load_adapter / resize / blend on tiny models, and bad input."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from riemann_diffusion import inject_adapters, iter_adapters, merge_adapters
from riemann_diffusion.export import (LoraFileError, blend_adapters, check_lora_matches, load_adapter,
                                      resize_adapter, save_adapter, write_lora)
from riemann_diffusion.state import METADATA_KEY, adapter_state, encode_metadata
from riemann_diffusion.tiny import make_tiny_unet


def moved_unet(kind="sd15", rank=2, seed=0):
    """A tiny UNet whose adapters sit at a random X ≠ X0."""
    unet = make_tiny_unet(kind)
    inject_adapters(unet, "auto", rank=rank, init_scale=0.05)
    g = torch.Generator().manual_seed(seed)
    for _, layer in iter_adapters(unet):
        A, B = layer.factors()
        layer.set_point(torch.linalg.qr(A + 0.3 * torch.randn(A.shape, generator=g))[0],
                        B + 0.05 * torch.randn(B.shape, generator=g))
    return unet


@pytest.fixture(scope="module")
def unet():
    return moved_unet()


def deltas(model):
    return {name: layer.delta_weight() for name, layer in iter_adapters(model)}


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers"])
def test_round_trip_is_exact_rank_2r(unet, tmp_path, fmt):
    report = save_adapter(unet, tmp_path / "a.safetensors", format=fmt, metadata={"base_model": "tiny/sd15"})
    assert (report.format, report.rank, report.relative_error, report.num_layers) == (fmt, 4, 0.0, 48)
    lora = load_adapter(report.path)
    assert lora.format == fmt and lora.family == "sd15" and set(lora.ranks().values()) == {4}
    for name, d in deltas(unet).items():
        torch.testing.assert_close(lora.delta(f"unet.{name}"), d, rtol=0, atol=1e-7)
    sd = load_file(report.path)
    if fmt == "kohya":
        assert all(k.startswith("lora_unet_") for k in sd)
        assert all(float(v) == 4.0 for k, v in sd.items() if k.endswith(".alpha"))  # alpha = R: scale 1
    else:
        assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)


def test_singular_values_split_evenly(unet, tmp_path):
    lora = load_adapter(save_adapter(unet, tmp_path / "a.safetensors").path)
    layer = next(iter(lora.layers.values()))
    gram_up, gram_down = layer.up.T @ layer.up, layer.down @ layer.down.T  # both diag(S)
    tol = 1e-5 * gram_up.abs().max().item()
    torch.testing.assert_close(gram_up, gram_down, rtol=0, atol=tol)
    torch.testing.assert_close(gram_up, torch.diag(torch.diagonal(gram_up)), rtol=0, atol=tol)


def test_provenance_metadata_without_local_paths(unet, tmp_path):
    meta = {"base_model": "stabilityai/sd-1.5", "optimizer": {"name": "Riemannion", "lr": 1e-3},
            "output_dir": "/home/user/run", "data": str(tmp_path), "win": "C:\\data\\x", "init": "loi"}
    path = save_adapter(unet, tmp_path / "a.safetensors", metadata=meta).path
    from safetensors import safe_open
    with safe_open(path, "pt") as fh:
        raw = fh.metadata()
    ours = json.loads(raw[METADATA_KEY])
    assert ours["base_model"] == "stabilityai/sd-1.5" and ours["optimizer"]["lr"] == 1e-3
    assert ours["init"] == "loi" and ours["rank"] == 2 and ours["format_version"] == 1
    assert "attn1.to_q" in ours["targets"]
    assert not {"output_dir", "data", "win"} & set(ours)
    assert "/home/" not in json.dumps(raw) and str(tmp_path) not in json.dumps(raw)


def test_recompression_reports_dense_error(unet, tmp_path):
    report = save_adapter(unet, tmp_path / "r.safetensors", rank=1)
    lora = load_adapter(report.path)
    num = den = 0.0
    for name, d in deltas(unet).items():
        U, S, Vh = torch.linalg.svd(d.double())
        torch.testing.assert_close(lora.delta(f"unet.{name}").double(), (U[:, :1] * S[:1]) @ Vh[:1],
                                   rtol=0, atol=1e-7)
        num, den = num + float((S[1:] ** 2).sum()), den + float((S ** 2).sum())
    assert report.relative_error == pytest.approx((num / den) ** 0.5, rel=1e-4) and report.relative_error > 0
    assert set(lora.ranks().values()) == {1}


@pytest.mark.parametrize("rank", [0, 5, -1, 2.0])
def test_bad_rank_is_a_clear_error(unet, tmp_path, rank):
    with pytest.raises(ValueError, match="rank must be an integer in \\[1, 4\\]"):
        save_adapter(unet, tmp_path / "r.safetensors", rank=rank)
    assert not os.listdir(tmp_path)


def test_blend_is_weighted_sum(unet):
    a = load_lora_in_memory(unet)
    b = load_lora_in_memory(moved_unet(seed=1))
    c = blend_adapters(a, b, 0.7, -0.2)
    for name in a.layers:
        torch.testing.assert_close(c.delta(name), 0.7 * a.delta(name) - 0.2 * b.delta(name), rtol=0, atol=1e-7)
    assert c.rank == 8
    d, err = resize_adapter(c, 3)
    assert d.rank == 3 and 0 < err < 1


def load_lora_in_memory(model):
    from riemann_diffusion.export import lora_from_model
    return lora_from_model(model)


def test_dit_auto_is_transformer_peft_and_kohya_refused(tmp_path):
    from riemann_diffusion.tiny import make_tiny_pipeline
    transformer = make_tiny_pipeline("flux").transformer
    inject_adapters(transformer, "auto", rank=2)
    report = save_adapter(transformer, tmp_path / "f.safetensors")
    assert report.format == "peft"
    assert all(k.startswith("transformer.") and ".alpha" not in k for k in load_file(report.path))
    with pytest.raises(ValueError, match="kohya names cover"):
        save_adapter(transformer, tmp_path / "k.safetensors", format="kohya")
    assert not (tmp_path / "k.safetensors").exists()


def test_training_checkpoint_state_reads_as_riemann_format(unet, tmp_path):
    meta = {"family": "sd15", "base_model": "tiny", "targets": "auto", "rank": 2, "init": "orthonormal",
            "optimizer": {"lr": 0.1}}
    save_file(adapter_state({"unet": unet}), str(tmp_path / "adapter_state.safetensors"),
              metadata=encode_metadata(meta))
    lora = load_adapter(tmp_path)  # the checkpoint folder
    assert lora.format == "riemann" and lora.family == "sd15" and lora.metadata["optimizer"] == {"lr": 0.1}
    for name, d in deltas(unet).items():
        torch.testing.assert_close(lora.delta(f"unet.{name}"), d, rtol=0, atol=1e-7)
    assert lora.resolve_format("auto") == "kohya"


def test_merge_adapters_fuses_exact_update():
    unet = moved_unet()
    ref = deltas(unet)
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in iter_adapters(unet)}
    merge_adapters(unet)
    for name, d in ref.items():
        torch.testing.assert_close(unet.get_submodule(name).weight - w0[name], d, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ bad input
@pytest.fixture
def good_file(unet, tmp_path):
    return save_adapter(unet, tmp_path / "good.safetensors").path


def test_truncated_file(good_file, tmp_path):
    data = open(good_file, "rb").read()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFileError, match="trunc.safetensors.*truncated or corrupt"):
        load_adapter(bad)


def test_garbage_and_missing_file(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(LoraFileError, match="junk.safetensors"):
        load_adapter(bad)
    with pytest.raises(LoraFileError, match="no such file"):
        load_adapter(tmp_path / "absent.safetensors")


def _edit(path, out, fn):
    sd = load_file(path)
    fn(sd)
    save_file(sd, str(out))
    return out


def test_nan_tensor_named(good_file, tmp_path):
    def poison(sd):
        key = sorted(k for k in sd if k.endswith("lora_up.weight"))[0]
        sd[key][0, 0] = float("inf")
    bad = _edit(good_file, tmp_path / "nan.safetensors", poison)
    with pytest.raises(LoraFileError, match="nan.safetensors.*lora_up.weight holds NaN/Inf"):
        load_adapter(bad)


def test_unknown_keys_listed(good_file, tmp_path):
    bad = _edit(good_file, tmp_path / "unk.safetensors", lambda sd: sd.update({"lora_unet_x.hada_w1_a": torch.ones(2)}))
    with pytest.raises(LoraFileError, match="unk.safetensors.*hada_w1_a"):
        load_adapter(bad)


def test_inconsistent_shapes_and_missing_half(good_file, tmp_path):
    def shrink(sd):
        key = sorted(k for k in sd if k.endswith("lora_up.weight"))[0]
        sd[key] = sd[key][:, :3].contiguous()
    with pytest.raises(LoraFileError, match="expected up \\(m, R\\) and down \\(R, n\\)"):
        load_adapter(_edit(good_file, tmp_path / "shape.safetensors", shrink))

    def drop(sd):
        del sd[sorted(k for k in sd if k.endswith("lora_down.weight"))[0]]
    with pytest.raises(LoraFileError, match="lacks its down tensor"):
        load_adapter(_edit(good_file, tmp_path / "half.safetensors", drop))


def test_file_for_another_architecture_or_shape(unet, good_file, tmp_path):
    lora = load_adapter(good_file)
    assert len(check_lora_matches(lora, unet)) == 48
    sdxl = make_tiny_unet("sdxl")
    with pytest.raises(LoraFileError, match="good.safetensors.*(do not exist|wrong shapes)"):
        check_lora_matches(lora, sdxl)
    from riemann_diffusion.tiny import make_tiny_pipeline
    with pytest.raises(LoraFileError, match="do not exist in FluxTransformer2DModel"):
        check_lora_matches(lora, make_tiny_pipeline("flux").transformer, "unet")


def test_failed_write_leaves_old_file_and_no_temp(unet, good_file, tmp_path):
    before = open(good_file, "rb").read()
    lora = load_adapter(good_file)
    name = next(iter(lora.layers))
    up, down, scale = lora.layers[name]
    lora.layers[name] = lora.layers[name]._replace(up=up * float("nan"))
    with pytest.raises(LoraFileError, match="NaN/Inf"):
        write_lora(lora, good_file)
    assert open(good_file, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["good.safetensors"]
    with pytest.raises(LoraFileError, match="does not exist"):
        write_lora(load_adapter(good_file), tmp_path / "missing_dir" / "x.safetensors")


def test_third_party_kohya_and_peft_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    kohya = {f"{key}.lora_down.weight": torch.randn(8, 64, generator=g),
             f"{key}.lora_up.weight": torch.randn(64, 8, generator=g), f"{key}.alpha": torch.tensor(4.0)}
    save_file(kohya, str(tmp_path / "k.safetensors"), metadata={"ss_network_dim": "8"})
    lora = load_adapter(tmp_path / "k.safetensors")
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert lora.format == "kohya" and lora.metadata == {} and lora.file_metadata["ss_network_dim"] == "8"
    torch.testing.assert_close(lora.delta(name), 0.5 * kohya[f"{key}.lora_up.weight"] @ kohya[f"{key}.lora_down.weight"])
    assert check_lora_matches(lora, make_tiny_unet("sd15")) == {name: name.split(".", 1)[1]}
    # re-written as PEFT the scale is folded into lora_B
    sd = lora.state_dict("peft")
    torch.testing.assert_close(sd[name + ".lora_B.weight"] @ sd[name + ".lora_A.weight"], lora.delta(name))


def test_continue_training_from_third_party_kohya(tmp_path):
    from riemann_diffusion.export import inject_from_lora
    g = torch.Generator().manual_seed(0)
    unet = make_tiny_unet("sd15")
    names = [n for n, _ in unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v"))]
    sd, ref = {}, {}
    for n in names:
        lin = unet.get_submodule(n)
        key = "lora_unet_" + n.replace(".", "_")
        down, up = torch.randn(3, lin.in_features, generator=g), torch.randn(lin.out_features, 3, generator=g)
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.5)})
        ref[n] = 0.5 * up @ down
    save_file(sd, str(tmp_path / "third.safetensors"))
    lora = load_adapter(tmp_path / "third.safetensors")
    w0 = {n: unet.get_submodule(n).weight.detach().clone() for n in names}
    x, ehs = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    reference = make_tiny_unet("sd15")
    with torch.no_grad():
        for n in names:
            reference.get_submodule(n).weight += ref[n]
        expected = reference(x, 10, ehs).sample
    assert sorted(inject_from_lora(unet, lora)) == sorted(names)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 10, ehs).sample, expected, rtol=1e-5, atol=1e-5)
    for n, layer in iter_adapters(unet):
        assert torch.equal(layer.base_layer.weight, w0[n])
        torch.testing.assert_close(layer.delta_weight(), ref[n], rtol=0, atol=1e-5)
    out = load_adapter(save_adapter(unet, tmp_path / "continued.safetensors").path)
    for n in names:
        torch.testing.assert_close(out.delta(f"unet.{n}"), ref[n], rtol=0, atol=1e-5)
