"""Training images: checks, conversions, transforms, deterministic order, and bad input that must
fail before the first training step."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from riemann_diffusion.training import ConfigError, DataError, TrainConfig, apply_overrides, train
from riemann_diffusion.training import data
from riemann_diffusion.training.data import (dataset_index, load_image_folder, sample_generator, to_rgb,
                                             transform_image)


def _good(path, color=(200, 30, 30), size=(64, 48)):
    Image.new("RGB", size, color).save(path)
    return path


def test_conversions_and_skips(tmp_path, caplog, monkeypatch):
    d = tmp_path / "imgs"
    d.mkdir()
    _good(d / "a_rgb.png")
    rgba = Image.new("RGBA", (40, 40), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    rgba.save(d / "b_rgba.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(d / "c_cmyk.jpg")  # CMYK red
    arr16 = np.full((32, 32), 65535, dtype=np.uint16)
    arr16[0, 0] = 32896  # 128 * 257
    Image.fromarray(arr16).save(d / "d_16bit.png")
    Image.new("RGB", (4, 4), (0, 255, 0)).save(d / "e_tiny.png")
    _good(d / "f_huge.jpg", size=(300, 200))
    (d / "g_notes.txt").write_text("not an image")
    (d / "h_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    monkeypatch.setattr(data, "MAX_PIXELS", 50_000)  # makes f_huge "huge" without a giant file
    with caplog.at_level(logging.WARNING, logger="riemann_diffusion.training.data"):
        images = load_image_folder(d, resolution=32)
    names = [im.path.name for im in images]
    assert names == ["a_rgb.png", "b_rgba.png", "c_cmyk.jpg", "d_16bit.png", "e_tiny.png", "f_huge.jpg"]
    assert all(im.image.mode == "RGB" for im in images)
    by = {im.path.name: im.image for im in images}
    assert by["b_rgba.png"].getpixel((0, 0)) == (255, 255, 255) and by["b_rgba.png"].getpixel((5, 5)) == (10, 20, 30)
    r, g, b = by["c_cmyk.jpg"].getpixel((20, 20))
    assert r > 200 and g < 60 and b < 60
    assert by["d_16bit.png"].getpixel((1, 1)) == (255, 255, 255) and by["d_16bit.png"].getpixel((0, 0)) == (128,) * 3
    assert min(by["f_huge.jpg"].size) == 64  # downscaled to 2x the resolution on load
    log = caplog.text
    for needle in ("g_notes.txt: not an image", "h_corrupt.png: cannot be read", "alpha composited",
                   "CMYK converted", "high bit depth", "small (4x4) upscaled", "huge (300x200)"):
        assert needle in log


def test_to_rgb_palette_with_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    rgb, note = to_rgb(p)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (255, 0, 0) and "alpha" in note


@pytest.mark.parametrize("setup,match", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "is empty"),
    (lambda d: (d.mkdir(), (d / "x.png").write_bytes(b"junk"), (d / "y.txt").write_text("t")), "no usable instance"),
])
def test_bad_folders(tmp_path, setup, match):
    d = tmp_path / "inst"
    setup(d)
    with pytest.raises(DataError, match=match):
        load_image_folder(d, 64)


def test_transform_crop_flip_range():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = 255  # left half white
    img = Image.fromarray(arr)
    x = transform_image(img, 32, center_crop=True, flip=False)
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    flipped = transform_image(img, 32, center_crop=True, flip=True)
    torch.testing.assert_close(flipped, x.flip(-1))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(transform_image(img, 32, False, False, g1), transform_image(img, 32, False, False, g2))


def test_sampling_is_a_function_of_its_arguments():
    a = torch.randn(3, generator=sample_generator(0, 5, 1, "instance"))
    b = torch.randn(3, generator=sample_generator(0, 5, 1, "instance"))
    c = torch.randn(3, generator=sample_generator(0, 5, 2, "instance"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    epoch0 = sorted(dataset_index(0, p, 5, "instance") for p in range(5))
    epoch1 = [dataset_index(0, p, 5, "instance") for p in range(5, 10)]
    assert epoch0 == list(range(5)) and sorted(epoch1) == list(range(5))


# ------------------------------------------------------------------ bad input stops train() before step 1
def _cfg(tmp_path, **kw):
    return apply_overrides(TrainConfig(), {"output_dir": str(tmp_path / "out"), "max_steps": 2,
                                           "progress_bar": False, "validate_every": -1, **kw})


def _no_training_happened(tmp_path):
    out = tmp_path / "out"
    return not (out / "log.jsonl").exists() and not (out / "checkpoints").exists()


def test_missing_instance_dir_fails_before_training(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(_cfg(tmp_path, instance_dir=str(tmp_path / "nope"), instance_prompt="a photo of sks dog"))
    assert _no_training_happened(tmp_path)


def test_own_images_need_a_prompt(tmp_path):
    d = tmp_path / "inst"
    d.mkdir()
    _good(d / "a.png")
    with pytest.raises(ConfigError, match="instance_prompt is required"):
        train(_cfg(tmp_path, instance_dir=str(d)))


@pytest.mark.parametrize("kw,match", [
    ({"targets": "no_such_layer_.*"}, "match no nn.Linear module"),
    ({"targets": ["to_qq"]}, "match no nn.Linear module"),
    ({"rank": 200}, r"rank must be an integer in \[1, "),
    ({"model": str("/definitely/not/here")}, "neither an existing folder nor a hub id"),
])
def test_model_dependent_bad_input(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        train(_cfg(tmp_path, **kw))
    assert _no_training_happened(tmp_path)


def test_local_pipeline_folder_trains(tmp_path):
    from riemann_diffusion.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline("sd15", tmp_path / "my-base")
    result = train(_cfg(tmp_path, model=str(folder), max_steps=1))
    from safetensors import safe_open

    with safe_open(str(result.adapter_path), "pt") as fh:
        meta = fh.metadata()
    assert "local:my-base" in meta["riemann_diffusion"] and str(tmp_path) not in meta["riemann_diffusion"]
