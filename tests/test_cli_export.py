"""``riemann-diffusion export`` and ``inspect`` on a training checkpoint and on LoRA files."""
import json

import pytest
import torch
from safetensors.torch import save_file

from riemann_diffusion import inject_adapters, iter_adapters
from riemann_diffusion.cli import main
from riemann_diffusion.export import load_adapter
from riemann_diffusion.state import adapter_state, encode_metadata
from riemann_diffusion.tiny import make_tiny_unet


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    unet = make_tiny_unet("sd15")
    inject_adapters(unet, "auto", rank=2)
    g = torch.Generator().manual_seed(0)
    for _, layer in iter_adapters(unet):
        A, B = layer.factors()
        layer.set_point(torch.linalg.qr(A + 0.3 * torch.randn(A.shape, generator=g))[0], B + 0.05 * torch.randn(B.shape, generator=g))
    folder = tmp_path_factory.mktemp("ckpt")
    meta = {"family": "sd15", "base_model": "tiny-sd15", "targets": "auto", "rank": 2, "init": "orthonormal",
            "optimizer": {"name": "Riemannion", "lr": 0.01}}
    save_file(adapter_state({"unet": unet}), str(folder / "adapter_state.safetensors"), metadata=encode_metadata(meta))
    deltas = {f"unet.{n}": layer.delta_weight() for n, layer in iter_adapters(unet)}
    return folder, deltas


@pytest.mark.parametrize("fmt,expected", [("auto", "kohya"), ("peft", "peft"), ("diffusers", "diffusers")])
def test_export_checkpoint_folder(checkpoint, tmp_path, capsys, fmt, expected):
    folder, deltas = checkpoint
    out = tmp_path / "lora.safetensors"
    assert main(["export", str(folder), "--format", fmt, "--out", str(out)]) == 0
    assert "exact" in capsys.readouterr().out
    lora = load_adapter(out)
    assert lora.format == expected and lora.metadata["base_model"] == "tiny-sd15"
    assert lora.metadata["optimizer"]["lr"] == 0.01 and lora.rank == 4
    for name, d in deltas.items():
        torch.testing.assert_close(lora.delta(name), d, rtol=0, atol=1e-7)


def test_rerank_an_exported_file(checkpoint, tmp_path, capsys):
    folder, deltas = checkpoint
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["export", str(folder / "adapter_state.safetensors"), "--out", str(first)]) == 0
    assert main(["export", str(first), "--format", "peft", "--rank", "1", "--out", str(second)]) == 0
    printed = capsys.readouterr().out
    err = float(printed.split("relative error ")[1].split()[0])
    num = den = 0.0
    for d in deltas.values():
        S = torch.linalg.svdvals(d.double())
        num, den = num + float((S[1:] ** 2).sum()), den + float((S ** 2).sum())
    assert err == pytest.approx((num / den) ** 0.5, rel=1e-3)
    lora = load_adapter(second)
    assert lora.format == "peft" and lora.rank == 1


def test_inspect_shows_format_ranks_provenance_and_spectra(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint
    out = tmp_path / "a.safetensors"
    main(["export", str(folder), "--out", str(out)])
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("format:     kohya", "family: sd15", "48 layers of rank 4", "attn2.to_out.0",
                   "lora_unet_", "tiny-sd15", "σmax="):
        assert needle in text
    assert main(["inspect", str(out), "--json", "--layers", "-1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 48 and len(info["singular_values"]) == 48
    assert all(row["effective_rank"] == 4 for row in info["singular_values"])


def test_cli_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"{not safetensors")
    assert main(["inspect", str(bad)]) == 2
    assert "broken.safetensors" in capsys.readouterr().out
    assert main(["export", str(bad), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "broken.safetensors" in capsys.readouterr().out
    assert not (tmp_path / "o.safetensors").exists()
