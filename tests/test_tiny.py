"""Tiny offline models and pipelines (riemann_diffusion.tiny) and example images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from riemann_diffusion import tiny
from riemann_diffusion.examples_data import ensure_example_images, list_images, make_example_images

PROMPT = "a photo of sks toy"
SEQ_KW = {"sd3": dict(max_sequence_length=16), "flux": dict(max_sequence_length=16)}


def _generate(pipe, kind, prompt=PROMPT, steps=2):
    return pipe(prompt, num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **SEQ_KW.get(kind, {})).images


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- tokenizers
def test_tokenizer_dir_loads_and_encodes(tmp_path):
    from transformers import CLIPTokenizer

    folder = tiny.make_tokenizer_dir(tmp_path / "tok")
    assert folder == tmp_path / "tok"
    assert (folder / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert {"<|startoftext|>", "<|endoftext|>", "a</w>", "the</w>"} <= vocab.keys()
    assert len(vocab) == len(set(vocab.values())) > 512

    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    assert len(tok) == len(vocab)  # the 3-token fallback vocab would mean the files were ignored
    ids = tok("The cat").input_ids
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    assert vocab["the</w>"] in ids  # merges applied, and lowercased
    assert tok.decode(ids, skip_special_tokens=True).strip() == "the cat"
    padded = tok(["a photo", "é 🙂"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (2, 77) and int(padded.max()) < len(tok)
    non_ascii = tok("é 🙂", add_special_tokens=False).input_ids
    assert len(non_ascii) == 2 + 4 and tok.unk_token_id not in non_ascii  # every UTF-8 byte has a token


def test_t5_tokenizer_encodes_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tok = tiny.make_t5_tokenizer()
    enc = tok("a photo of sks Toy!")
    assert tok.convert_ids_to_tokens(enc.input_ids) == ["▁a", "▁photo", "▁of", "▁sks", "▁T", "o", "y", "!", "</s>"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["a photo of sks toy", "Unseen ünïcode 42"]
    assert again(texts, padding="max_length", max_length=12).input_ids == \
        tok(texts, padding="max_length", max_length=12).input_ids


# --------------------------------------------------------------------------- UNets
def test_tiny_unet_sd15_shape_size_determinism():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    unet = tiny.make_tiny_unet("sd15", seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG is untouched

    assert 1.3e6 < _n_params(unet) < 1.6e6
    assert unet.config.sample_size == 8 and unet.config.cross_attention_dim == 32
    same = tiny.make_tiny_unet("sd15", seed=0)
    other = tiny.make_tiny_unet("sd15", seed=1)
    sd, sd_same, sd_other = unet.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_same[k]) for k in sd)
    assert not torch.equal(sd["conv_in.weight"], sd_other["conv_in.weight"])

    with torch.no_grad():
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 5, 32)).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert tiny.make_tiny_unet("sd15", dtype=torch.bfloat16).conv_in.weight.dtype == torch.bfloat16


def test_tiny_unet_sdxl_and_small():
    unet = tiny.make_tiny_unet("sdxl")
    assert unet.config.addition_embed_type == "text_time"
    cond = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 7, 64),
                   added_cond_kwargs=cond).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()

    small = tiny.make_tiny_unet("small")
    assert 15e6 < _n_params(small) < 22e6 and small.config.cross_attention_dim == 256


def test_full_sd15_config_has_the_published_size():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes only: no 3.4 GB of weights
        unet = UNet2DConditionModel(**tiny.sd15_full_unet_config())
    assert _n_params(unet) == 859_520_964


def test_unknown_kinds_are_rejected():
    with pytest.raises(ValueError, match="sd15"):
        tiny.tiny_unet_config("sd2")
    with pytest.raises(ValueError, match="flux"):
        tiny.make_tiny_pipeline("kandinsky")


# --------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("kind", tiny.PIPELINE_KINDS)
def test_pipeline_generates_finite_images(kind):
    pipe = tiny.make_tiny_pipeline(kind, seed=0)
    images = _generate(pipe, kind)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 1e-3  # not a constant image
    # The text encoders are wired in: a different prompt changes the image.
    assert not np.array_equal(images, _generate(pipe, kind, prompt="a painting of the cat"))


@pytest.mark.parametrize("kind", tiny.PIPELINE_KINDS)
def test_save_reload_round_trip(kind, tmp_path):
    from diffusers import DiffusionPipeline

    folder = tiny.save_tiny_pipeline(kind, tmp_path / kind, seed=0)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert (folder / "model_index.json").is_file() and size < 12e6

    reloaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    original = tiny.make_tiny_pipeline(kind, seed=0)
    assert type(reloaded) is type(original)
    for name, module in original.components.items():
        if isinstance(module, torch.nn.Module):
            a, b = module.state_dict(), reloaded.components[name].state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # Weights are bit-identical; safetensors' mmap can leave tensors unaligned, which
    # picks other CPU kernels, so the images agree to float32 rounding, not bitwise.
    np.testing.assert_allclose(_generate(reloaded, kind), _generate(original, kind), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_kohya_lora_loads_into_unet_pipelines(kind, tmp_path):
    from safetensors.torch import save_file

    pipe = tiny.make_tiny_pipeline(kind)
    base = _generate(pipe, kind)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=g)
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=g)
            state[f"{key}.alpha"] = torch.tensor(4.0)
    assert state
    save_file(state, tmp_path / "lora.safetensors")
    pipe.load_lora_weights(tmp_path, weight_name="lora.safetensors")
    assert np.abs(_generate(pipe, kind) - base).max() > 1e-3


# --------------------------------------------------------------------------- example images
def test_example_images_valid_and_deterministic(tmp_path):
    paths = make_example_images(tmp_path / "a", n=5, size=64, seed=0)
    assert [p.name for p in paths] == [f"subject_{i:02d}.png" for i in range(5)]
    arrays = []
    for path in paths:
        assert path.stat().st_size < 16_000
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
            arrays.append(np.asarray(im))
    assert all(a.std() > 10 for a in arrays)  # drawn content, not flat
    assert all(not np.array_equal(arrays[0], a) for a in arrays[1:])  # varied shots

    again = make_example_images(tmp_path / "b", n=5, size=64, seed=0)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    other = make_example_images(tmp_path / "c", n=5, size=64, seed=1)
    assert [p.read_bytes() for p in other] != [p.read_bytes() for p in paths]
    with Image.open(make_example_images(tmp_path / "d", n=1, size=96)[0]) as im:
        assert im.size == (96, 96)
    with pytest.raises(ValueError, match="n=0"):
        make_example_images(tmp_path / "e", n=0)


def test_ensure_example_images_only_fills_empty_dirs(tmp_path):
    created = ensure_example_images(tmp_path / "new", n=3)
    assert len(created) == 3 and list_images(tmp_path / "new") == created

    mine = tmp_path / "mine"
    mine.mkdir()
    Image.new("RGB", (32, 32), "red").save(mine / "own.jpg")
    (mine / "notes.txt").write_text("not an image")
    assert ensure_example_images(mine) == [mine / "own.jpg"]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "own.jpg"]
