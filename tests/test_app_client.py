"""The demo over HTTP with gradio_client, as a script (or a person) would use it.

The server runs on 127.0.0.1 with a free port, in this process for the API tests and
as ``python -m app`` for the CLI test; every wait is bounded and the server is
closed at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from app.layout import build_demo  # noqa: E402
from app.pipeline import DemoBackend  # noqa: E402
from app.train_job import training_available  # noqa: E402

from app_support import FAST, PROMPT, as_array, free_port, served, write_adapter  # noqa: E402

ENDPOINTS = {"/generate", "/inspect", "/train", "/cancel_train", "/list_adapters", "/refresh_adapters"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    adapters = root / "adapters"
    adapters.mkdir()
    write_adapter(adapters / "toy.safetensors")
    backend = DemoBackend(adapters, root / "work",
                          train_overrides={"validation_steps": 2, "checkpoint_every": 0})
    with served(build_demo(backend)) as url:
        yield Client(url, verbose=False), backend, root


def _generate(client, **kw):
    args = dict(model="tiny", prompt=PROMPT, negative="", adapter="toy.safetensors", upload=None, strength=1.0,
                steps=FAST["steps"], guidance=FAST["guidance"], seed=FAST["seed"], resolution=FAST["resolution"])
    args.update(kw)
    return client.predict(*args.values(), api_name="/generate")


def test_every_event_is_named_in_the_api(server):
    client, _, _ = server
    assert ENDPOINTS <= set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])


def test_generate_returns_base_and_adapted_images_from_one_seed(server):
    from riemann_diffusion.tiny import make_tiny_pipeline

    client, _, _ = server
    base_path, adapted_path, info = _generate(client)
    pipe = make_tiny_pipeline("sd15")
    with torch.inference_mode():
        ref = pipe(PROMPT, num_inference_steps=FAST["steps"], guidance_scale=FAST["guidance"], height=64, width=64,
                   generator=torch.Generator("cpu").manual_seed(FAST["seed"]), output_type="pil").images[0]
    base, adapted = as_array(base_path), as_array(adapted_path)
    assert base.shape == adapted.shape == (64, 64, 3)
    np.testing.assert_array_equal(base, as_array(ref))  # PNG transport is lossless
    assert np.abs(adapted - base).mean() > 2.0
    assert "toy.safetensors" in info and "seed 3" in info


def test_inspect_returns_summary_table_and_plot(server):
    client, _, _ = server
    summary, table, plot = client.predict("toy.safetensors", None, api_name="/inspect")
    assert summary["format"] == "kohya" and summary["targets"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert len(table["data"]) == summary["layers"] == 48
    assert as_array(plot).shape[:2] == (380, 700)


@pytest.mark.parametrize("kw, words", [
    (dict(prompt=""), "Prompt is empty"),
    (dict(steps=5000), "5000"),
    (dict(resolution=12345), "multiple of 8"),
    (dict(adapter="(none)", upload="garbage"), "not a readable safetensors"),
])
def test_bad_input_is_a_readable_error_and_the_server_stays_up(server, kw, words):
    client, _, root = server
    if kw.get("upload") == "garbage":
        bad = root / "garbage.safetensors"
        bad.write_bytes(b"this is not a LoRA")
        kw["upload"] = handle_file(str(bad))
    with pytest.raises(Exception, match=words):
        _generate(client, **kw)
    _, adapted, _ = _generate(client)  # still serving, adapter still applies
    assert adapted is not None


def test_training_without_images_or_with_a_text_file_is_refused(server):
    client, _, root = server
    with pytest.raises(Exception, match="No training images"):
        client.predict([], PROMPT, 2, 5, 0.1, "tiny", api_name="/train")
    fake = root / "holiday.jpg"
    fake.write_text("not really a jpeg")
    with pytest.raises(Exception, match="'holiday.jpg' is not an image"):
        client.predict([handle_file(str(fake))], PROMPT, 2, 5, 0.1, "tiny", api_name="/train")


@pytest.mark.skipif(not training_available(), reason="riemann_diffusion.training is not installed")
def test_five_step_training_exports_an_adapter_that_inspect_and_generate_use(server):
    from riemann_diffusion.examples_data import make_example_images
    from riemann_diffusion.export import load_adapter

    client, backend, root = server
    images = [handle_file(str(p)) for p in make_example_images(root / "subject", n=3)]
    status, loss, adapter_file, grid, dropdown, _ = client.predict(images, PROMPT, 2, 5, 0.1, "tiny",
                                                                   api_name="/train")
    assert status.startswith("Done: 5/5 steps"), status
    assert [row[0] for row in loss["data"]] == [1, 2, 3, 4, 5]  # the loss plot's (step, loss) rows
    assert all(np.isfinite(row[1]) and row[1] > 0 for row in loss["data"])
    lora = load_adapter(adapter_file)
    assert lora.family == "sd15" and lora.rank == 4 and len(lora.layers) > 0
    choice = dropdown["value"]  # the new adapter is selected in the Generate tab
    assert choice in backend.list_adapters() and Path(backend.adapters_dir, choice).is_file()
    assert as_array(grid).shape[1] > 64, "the run's validation grid (base vs adapted) is shown"
    summary, _, _ = client.predict(choice, None, api_name="/inspect")
    assert summary["provenance"]["rank"] == 2
    _, adapted, _ = _generate(client, adapter=choice)
    assert adapted is not None


@pytest.mark.skipif(not training_available(), reason="riemann_diffusion.training is not installed")
def test_training_can_be_cancelled_from_the_api(server):
    from riemann_diffusion.examples_data import make_example_images

    client, _, root = server
    images = [handle_file(str(p)) for p in make_example_images(root / "subject2", n=2)]
    job = client.submit(images, PROMPT, 2, 5000, 0.1, "tiny", api_name="/train")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(str(o[0]).startswith("Step") for o in job.outputs()):
        time.sleep(0.2)
    assert "Cancelling" in client.predict(api_name="/cancel_train")
    status = job.result(timeout=60)[0]
    assert status.startswith("Cancelled at step"), status
    step = int(status.split("step ")[1].split("/")[0])
    assert 1 <= step < 5000


@pytest.mark.slow
def test_cli_serves_on_localhost(tmp_path):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--adapters-dir", str(tmp_path)],
                            cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline, up = time.monotonic() + 90, False
        while time.monotonic() < deadline and proc.poll() is None and not up:
            try:
                up = urllib.request.urlopen(url, timeout=2).status == 200
            except OSError:
                time.sleep(0.3)
        assert up, f"demo did not come up on {url}"
        client = Client(url, verbose=False)
        assert client.predict("(none)", api_name="/list_adapters")["value"] == "(none)"  # empty folder
        base, adapted, info = _generate(client, adapter="(none)")
        assert as_array(base).shape == (64, 64, 3) and adapted is None and "no adapter" in info
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}" in out
