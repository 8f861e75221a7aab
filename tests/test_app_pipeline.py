"""The demo's gradio-free core: generate base vs adapted, inspect, bad input, training jobs.

References are independent of the code under test: the base image is compared with a
freshly built tiny pipeline, the adapted image with the Riemann adapters themselves
running inside the UNet (``set_adapter_scale``) instead of diffusers' loader, and the
singular values with a dense ``torch.linalg.svdvals`` of each layer's ``X − X0``.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from app.inputs import DemoInputError
from app.models import PipelineCache, resolve_model
from app.pipeline import DemoBackend, singular_value_plot
from app.train_job import build_train_config, train_defaults, training_available

from app_support import FAST, PROMPT, as_array, write_adapter


def _render(pipe, seed=FAST["seed"], steps=FAST["steps"]):
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=FAST["guidance"], height=64, width=64,
                    generator=g, output_type="pil").images[0]


@pytest.fixture(scope="module")
def adapter_env(tmp_path_factory):
    """An adapters folder with one sd15 adapter, the pipeline it came from, and a backend."""
    root = tmp_path_factory.mktemp("demo")
    adapters = root / "adapters"
    adapters.mkdir()
    path, source_pipe = write_adapter(adapters / "toy.safetensors")
    backend = DemoBackend(adapters, root / "work")
    return backend, path, source_pipe


def test_base_image_equals_a_fresh_pipeline_and_strength_zero_equals_base(adapter_env):
    from riemann_diffusion.tiny import make_tiny_pipeline

    backend, _, _ = adapter_env
    reference = as_array(_render(make_tiny_pipeline("sd15")))
    plain = backend.generate(prompt=PROMPT, **FAST)
    assert plain.adapted is None
    np.testing.assert_array_equal(as_array(plain.base), reference)
    zero = backend.generate(prompt=PROMPT, adapter="toy.safetensors", strength=0.0, **FAST)
    np.testing.assert_array_equal(as_array(zero.base), reference)  # base drawn with LoRA disabled
    np.testing.assert_array_equal(as_array(zero.adapted), reference)  # strength 0 = no change


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_adapted_image_matches_the_adapters_run_in_the_unet(adapter_env, strength):
    from riemann_diffusion import set_adapter_scale

    backend, _, source_pipe = adapter_env
    set_adapter_scale(source_pipe.unet, strength)
    reference = as_array(_render(source_pipe))
    out = backend.generate(prompt=PROMPT, adapter="toy.safetensors", strength=strength, **FAST)
    adapted, base = as_array(out.adapted), as_array(out.base)
    assert np.abs(adapted - base).mean() > 2.0, "the adapter should visibly change the image"
    assert np.abs(adapted - reference).max() <= 2.0  # uint8 rounding of two fp32 paths
    assert "toy.safetensors" in out.info and f"strength {strength:g}" in out.info


def test_base_after_adapted_run_has_no_adapter_and_cache_loads_once(adapter_env):
    backend, _, _ = adapter_env
    loads = backend.cache.loads
    with_adapter = backend.generate(prompt=PROMPT, adapter="toy.safetensors", **FAST)
    without = backend.generate(prompt=PROMPT, **FAST)
    np.testing.assert_array_equal(as_array(without.base), as_array(with_adapter.base))
    assert backend.cache.loads == loads  # the pipeline was built once for the module


def test_upload_beats_folder_choice(adapter_env, tmp_path):
    backend, path, _ = adapter_env
    assert backend.resolve_adapter("toy.safetensors", str(path)) == path
    assert backend.resolve_adapter("(none)", None) is None
    assert backend.list_adapters() == ["toy.safetensors"]


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompt="   "), "Prompt is empty"),
    (dict(prompt=PROMPT, steps=0), "Steps must be between 1 and"),
    (dict(prompt=PROMPT, steps=100000), "Steps must be between 1 and"),
    (dict(prompt=PROMPT, resolution=77), "multiple of 8"),
    (dict(prompt=PROMPT, resolution=100000), "multiple of 8 between 64"),
    (dict(prompt=PROMPT, guidance=float("nan")), "finite"),
    (dict(prompt=PROMPT, seed="abc"), "Seed must be a number"),
    (dict(prompt=PROMPT, adapter="../../etc/passwd"), "is not a .safetensors file"),
    (dict(prompt=PROMPT, model="no such model!"), "neither a built-in"),
])
def test_bad_generate_input_is_a_readable_error(adapter_env, kwargs, words):
    backend, _, _ = adapter_env
    with pytest.raises(DemoInputError, match=words):
        backend.generate(**{**FAST, **kwargs})


def test_corrupt_and_foreign_adapters_are_refused_and_the_pipeline_survives(adapter_env, tmp_path):
    backend, path, _ = adapter_env
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 10)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    foreign, _ = write_adapter(tmp_path / "sdxl.safetensors", kind="sdxl")
    for bad, words in [(garbage, "not a readable safetensors"), (truncated, "not a readable safetensors"),
                       (foreign, "does not fit model 'tiny'")]:
        with pytest.raises(DemoInputError, match=words):
            backend.generate(prompt=PROMPT, adapter_upload=str(bad), **FAST)
    good = backend.generate(prompt=PROMPT, adapter="toy.safetensors", **FAST)
    assert good.adapted is not None and np.abs(as_array(good.adapted) - as_array(good.base)).mean() > 2.0


def test_inspect_reports_format_targets_ranks_provenance_and_exact_singular_values(adapter_env):
    from riemann_diffusion import iter_adapters

    backend, _, source_pipe = adapter_env
    report, image = backend.inspect("toy.safetensors")
    summary = report.summary()
    assert summary["format"] == "kohya" and summary["family"] == "sd15"
    assert summary["targets"] == ["to_k", "to_out.0", "to_q", "to_v"]
    adapters = dict(iter_adapters(source_pipe.unet))
    assert summary["layers"] == len(adapters) and summary["ranks"] == {"4": len(adapters)}  # exported rank 2r
    assert summary["provenance"]["rank"] == 2
    for layer in report.layers:
        dense = torch.linalg.svdvals(adapters[layer.name.split(".", 1)[1]].delta_weight().double())
        np.testing.assert_allclose(layer.singular_values, dense[: layer.rank].numpy(), rtol=1e-4, atol=1e-6)
    rows = report.table()
    assert len(rows) == len(adapters)
    for row in rows:  # [name, m×n, stored rank, numerical rank, ...]: only B moved, so X − X0 has rank r = 2
        dense_rank = torch.linalg.matrix_rank(adapters[row[0].split(".", 1)[1]].delta_weight().double(), rtol=1e-6)
        assert (row[2], row[3]) == (4, int(dense_rank))
    assert image.size == (700, 380) and np.asarray(image).std() > 10  # a drawn plot, not a blank canvas


def test_singular_value_plot_of_an_exactly_low_rank_file_is_finite(adapter_env):
    backend, _, _ = adapter_env
    report, _ = backend.inspect("toy.safetensors")
    for layer in report.layers:
        layer.singular_values = [layer.singular_values[0], 0.0, 0.0, 0.0]
    assert singular_value_plot(report).size == (700, 380)


def test_inspect_without_a_file_and_with_garbage_is_readable(adapter_env, tmp_path):
    backend, _, _ = adapter_env
    with pytest.raises(DemoInputError, match="Choose an adapter"):
        backend.inspect("(none)", None)
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"{}")
    with pytest.raises(DemoInputError, match="x.safetensors"):
        backend.inspect(None, str(bad))


def test_pipeline_cache_keeps_one_model_and_reloads_after_eviction():
    built = []
    cache = PipelineCache(capacity=1, loader=lambda name: built.append(name) or object())
    a = cache.get("tiny")
    assert cache.get("tiny") is a and built == ["tiny"]
    cache.get("tiny-sdxl")
    assert "tiny" not in cache and cache.get("tiny") is not a and built == ["tiny", "tiny-sdxl", "tiny"]


def test_a_local_model_folder_loads_and_matches_the_builtin(adapter_env, tmp_path):
    from riemann_diffusion.tiny import save_tiny_pipeline

    backend, _, _ = adapter_env
    folder = save_tiny_pipeline("sd15", tmp_path / "my-model")
    local = DemoBackend(backend.adapters_dir, tmp_path / "work")
    out = local.generate(model=str(folder), prompt=PROMPT, adapter="toy.safetensors", **FAST)
    ref = backend.generate(prompt=PROMPT, adapter="toy.safetensors", **FAST)
    np.testing.assert_array_equal(as_array(out.base), as_array(ref.base))
    assert np.abs(as_array(out.adapted) - as_array(ref.adapted)).max() <= 2.0
    assert str(folder) in out.info


def test_resolve_model_kinds(tmp_path):
    assert resolve_model("") == ("tiny", "tiny")
    assert resolve_model("stabilityai/sd-turbo") == ("hub", "stabilityai/sd-turbo")
    with pytest.raises(DemoInputError, match="model_index.json"):
        resolve_model(str(tmp_path))


# ------------------------------------------------------------------ training
def _fake_train(losses, fail_at=None):
    def train(config, callback=None):
        for step, loss in enumerate(losses, 1):
            if step == fail_at:
                raise RuntimeError("out of memory in the fake trainer")
            time.sleep(0.01)
            if callback(step, len(losses), loss, 0.1) is False:
                return type("R", (), {"cancelled": True, "adapter_path": None})()
        return type("R", (), {"cancelled": False, "adapter_path": None})()
    return train


def _images(tmp_path, n=2):
    from riemann_diffusion.examples_data import make_example_images

    return [str(p) for p in make_example_images(tmp_path / "imgs", n=n)]


def test_train_job_records_every_step_and_finishes(adapter_env, tmp_path):
    backend, _, _ = adapter_env
    losses = [1.0, 0.8, 0.7, 0.65, 0.6]
    jid, job = backend.start_training(_images(tmp_path), PROMPT, 4, 5, 0.1, train_fn=_fake_train(losses))
    assert job.wait(10) and job.state == "done" and backend.jobs[jid] is job
    assert [(p.step, p.total, p.loss) for p in job.history] == [(i + 1, 5, v) for i, v in enumerate(losses)]
    # the demo copied the uploads as RGB PNGs and pointed the config at them
    assert sorted(p.name for p in Path(job.config["instance_dir"]).iterdir()) == ["image_000.png", "image_001.png"]
    assert job.config["max_steps"] == 5 and job.config["rank"] == 4 and job.config["lr"] == 0.1


def test_train_job_cancel_stops_early_and_failure_is_reported(adapter_env, tmp_path):
    backend, _, _ = adapter_env
    jid, job = backend.start_training(_images(tmp_path), PROMPT, 4, 200, 0.1, train_fn=_fake_train([1.0] * 200))
    deadline = time.monotonic() + 10
    while not job.history and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "Cancelling" in backend.cancel_training(jid)
    assert job.wait(10) and job.state == "cancelled" and len(job.history) < 200
    assert backend.cancel_training(jid) == "No training is running."
    _, failing = backend.start_training(_images(tmp_path), PROMPT, 4, 5, 0.1, train_fn=_fake_train([1.0] * 5, 3))
    assert failing.wait(10) and failing.state == "failed" and "out of memory" in failing.error


@pytest.mark.parametrize("kwargs, words", [
    (dict(images=None), "No training images"),
    (dict(images=[]), "No training images"),
    (dict(prompt=""), "Instance prompt is empty"),
    (dict(rank=0), "Rank must be between"),
    (dict(steps=10**9), "Training steps must be between"),
    (dict(lr=-1), "Learning rate must be in"),
])
def test_bad_training_input_is_a_readable_error(adapter_env, tmp_path, kwargs, words):
    backend, _, _ = adapter_env
    args = {**dict(images=_images(tmp_path), prompt=PROMPT, rank=4, steps=5, lr=0.1), **kwargs}
    with pytest.raises(DemoInputError, match=words):
        backend.start_training(args["images"], args["prompt"], args["rank"], args["steps"], args["lr"],
                               train_fn=_fake_train([1.0]))


def test_a_non_image_upload_is_named_in_the_error(adapter_env, tmp_path):
    backend, _, _ = adapter_env
    notes = tmp_path / "notes.png"
    notes.write_text("this is text, not a picture")
    with pytest.raises(DemoInputError, match="'notes.png' is not an image"):
        backend.start_training([*_images(tmp_path), str(notes)], PROMPT, 4, 5, 0.1, train_fn=_fake_train([1.0]))


@pytest.mark.skipif(not training_available(), reason="riemann_diffusion.training is not installed")
def test_ui_defaults_are_train_config_defaults_and_overrides_land_in_the_tree():
    from riemann_diffusion.training import TrainConfig

    cfg = TrainConfig()
    defaults = train_defaults()
    assert (defaults["rank"], defaults["max_steps"], defaults["lr"]) == (cfg.adapter.rank, cfg.run.max_steps, cfg.lr)
    built = build_train_config({"rank": 3, "max_steps": 7, "lr": 0.05, "instance_prompt": "a photo of sks cat"})
    assert (built.adapter.rank, built.run.max_steps, built.optim.lr) == (3, 7, 0.05)
    assert built.data.instance_prompt == "a photo of sks cat"


def test_pipeline_module_does_not_import_gradio():
    """Layout is the only module that imports gradio (checked in the source, import by import)."""
    root = Path(__file__).resolve().parents[1] / "app"
    importers = set()
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("gradio", "gradio_client") for n in names):
                importers.add(path.name)
    assert importers == {"layout.py"}
