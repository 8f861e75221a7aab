"""The Gradio page: three tabs wired to :class:`app.pipeline.DemoBackend`.

The only module of the demo that imports gradio. Every event has an ``api_name``
(``/generate``, ``/inspect``, ``/train``, ``/cancel_train``, ``/list_adapters``,
``/refresh_adapters``), so ``gradio_client`` can script what a person clicks. Bad
input reaches the page as a ``gr.Error`` pop-up with the backend's message; the
server keeps running.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time

import gradio as gr
import pandas as pd

from . import inputs
from .pipeline import NO_ADAPTER, DemoBackend, DemoInputError, GENERATE_DEFAULTS, train_defaults, training_available
from .train_job import result_paths

logger = logging.getLogger(__name__)

__all__ = ["build_demo", "launch", "CSS"]

INTRO = """# riemann-diffusion
Low-rank adapters trained with **Riemannion** (Riemannian momentum on the fixed-rank manifold).
The default model `tiny` is a random-weight pipeline built offline: its pictures are noise-like
patterns, but every button works end to end. Type a local diffusers folder or a hub id to use real weights."""


#: scale the result images to their boxes (the tiny model's 64×64 pictures would be stamps)
CSS = """
#base-image img, #adapted-image img, #train-grid img { width: 100%; height: 100%; object-fit: contain; }
"""


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, **kwargs):
    """``demo.queue()`` then ``demo.launch`` on ``host:port`` with the demo's CSS; returns launch()'s tuple."""
    demo.queue()
    return demo.launch(server_name=host, server_port=port, css=CSS, **kwargs)


def _as_gr_error(exc: Exception) -> gr.Error:
    if isinstance(exc, DemoInputError):
        return gr.Error(str(exc), print_exception=False)
    logger.exception("demo handler failed")
    return gr.Error(f"Unexpected error ({type(exc).__name__}): {str(exc)[:300]}. The server log has details.")


def _friendly(fn):
    """Turn backend exceptions into ``gr.Error`` for plain and generator handlers."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise _as_gr_error(exc) from exc
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise _as_gr_error(exc) from exc
    return wrapper


def _loss_frame(job) -> pd.DataFrame:
    return pd.DataFrame({"step": [p.step for p in job.history], "loss": [p.loss for p in job.history]})


def _adapter_choices(backend: DemoBackend, keep=None) -> dict:
    names = backend.list_adapters()
    value = keep if keep in names else (names[0] if names else NO_ADAPTER)
    return gr.update(choices=[NO_ADAPTER, *names], value=value)


def build_demo(backend: DemoBackend | None = None, poll_seconds: float = 0.3) -> gr.Blocks:
    """The demo page for ``backend`` (a default :class:`DemoBackend` if None). Call ``.queue()`` before launch."""
    backend = backend or DemoBackend()
    names = backend.list_adapters()
    first = names[0] if names else NO_ADAPTER
    tdef = train_defaults()

    with gr.Blocks(title="riemann-diffusion demo") as demo:
        gr.Markdown(INTRO)
        model = gr.Textbox(value=backend.model, label="Base model",
                           info="'tiny' (offline, built in), a local diffusers folder, or a hub id like owner/name")
        with gr.Tabs():
            # ---------------------------------------------------------- Generate
            with gr.Tab("Generate"):
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt = gr.Textbox(value="a photo of sks toy", label="Prompt", lines=2)
                        negative = gr.Textbox(label="Negative prompt", placeholder="optional")
                        with gr.Row():
                            adapter = gr.Dropdown([NO_ADAPTER, *names], value=first, label="Adapter from folder",
                                                  info=str(backend.adapters_dir), scale=4)
                            refresh = gr.Button("Refresh list", scale=1, size="sm")
                        adapter_upload = gr.File(label="…or upload an adapter (.safetensors)",
                                                 file_types=[".safetensors"], height=120)
                        strength = gr.Slider(-2, 2, value=GENERATE_DEFAULTS["strength"], step=0.05,
                                             label="Adapter strength")
                        with gr.Row():
                            steps = gr.Slider(1, inputs.MAX_STEPS, value=GENERATE_DEFAULTS["steps"], step=1,
                                              label="Steps")
                            guidance = gr.Slider(0, 30, value=GENERATE_DEFAULTS["guidance"], step=0.5,
                                                 label="Guidance")
                        with gr.Row():
                            seed = gr.Number(value=GENERATE_DEFAULTS["seed"], precision=0, label="Seed")
                            resolution = gr.Number(value=0, precision=0, label="Resolution (px, 0 = model default)")
                        generate_btn = gr.Button("Generate", variant="primary")
                    with gr.Column(scale=3):
                        with gr.Row():
                            base_img = gr.Image(label="Base model", type="pil", format="png", height=320,
                                                elem_id="base-image")
                            adapted_img = gr.Image(label="With adapter", type="pil", format="png", height=320,
                                                   elem_id="adapted-image")
                        gen_info = gr.Markdown(elem_id="generate-info")

            # ---------------------------------------------------------- Train
            with gr.Tab("Train"):
                if not training_available():
                    gr.Markdown("**Training is not available in this installation** "
                                "(`riemann_diffusion.training` is missing).")
                with gr.Row():
                    with gr.Column(scale=2):
                        train_images = gr.File(label="Subject images (a few photos)", file_count="multiple",
                                               file_types=["image"], height=180)
                        train_prompt = gr.Textbox(value=tdef["instance_prompt"], label="Instance prompt",
                                                  info="use a rare token for your subject, e.g. 'a photo of sks dog'")
                        with gr.Row():
                            train_rank = gr.Number(value=tdef["rank"], precision=0, label="Rank r")
                            train_steps = gr.Number(value=tdef["max_steps"], precision=0, label="Steps")
                            train_lr = gr.Number(value=tdef["lr"], label="Learning rate")
                        with gr.Row():
                            train_btn = gr.Button("Train", variant="primary")
                            cancel_btn = gr.Button("Cancel", variant="stop")
                    with gr.Column(scale=3):
                        train_status = gr.Markdown("Upload images and press Train.")
                        loss_plot = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss",
                                                title="Training loss", height=260)
                        train_file = gr.File(label="Trained adapter (download)", interactive=False)
                        train_samples = gr.Image(label="Validation grid: base vs adapted", type="filepath",
                                                 height=300, interactive=False, elem_id="train-grid")
                job_id = gr.State(None)

            # ---------------------------------------------------------- Inspect
            with gr.Tab("Inspect"):
                with gr.Row():
                    with gr.Column(scale=2):
                        inspect_choice = gr.Dropdown([NO_ADAPTER, *names], value=first, label="Adapter from folder")
                        inspect_upload = gr.File(label="…or upload an adapter (.safetensors)",
                                                 file_types=[".safetensors"], height=120)
                        inspect_btn = gr.Button("Inspect", variant="primary")
                        summary = gr.JSON(label="Format, targets, ranks, provenance")
                    with gr.Column(scale=3):
                        sv_plot = gr.Image(label="Singular values of ΔW per layer", type="pil", format="png")
                layer_table = gr.Dataframe(headers=["layer", "m×n", "rank", "numerical rank", "‖ΔW‖_F",
                                                    "top singular values"], label="Layers", wrap=True)

        # -------------------------------------------------------------- events
        @_friendly
        def do_generate(model_name, prompt_text, negative_text, adapter_name, upload, strength_v, steps_v,
                        guidance_v, seed_v, resolution_v):
            r = backend.generate(model_name, prompt_text, negative_text, steps_v, guidance_v, seed_v, strength_v,
                                 resolution_v, adapter_name, upload)
            return r.base, r.adapted, r.info

        generate_btn.click(do_generate, [model, prompt, negative, adapter, adapter_upload, strength, steps,
                                         guidance, seed, resolution], [base_img, adapted_img, gen_info],
                           api_name="generate")

        @_friendly
        def do_list(current):
            return _adapter_choices(backend, current)

        refresh.click(do_list, adapter, adapter, api_name="list_adapters")
        demo.load(lambda a, b: (_adapter_choices(backend, a), _adapter_choices(backend, b)),
                  [adapter, inspect_choice], [adapter, inspect_choice], api_name="refresh_adapters")

        @_friendly
        def do_inspect(choice, upload):
            report, image = backend.inspect(choice, upload)
            return report.summary(), report.table(), image

        inspect_btn.click(do_inspect, [inspect_choice, inspect_upload], [summary, layer_table, sv_plot],
                          api_name="inspect")

        @_friendly
        def do_train(files, prompt_text, rank_v, steps_v, lr_v, model_name, progress=gr.Progress()):
            jid, job = backend.start_training(files, prompt_text, rank_v, steps_v, lr_v, model=model_name)
            progress(0, desc="starting")
            yield jid, "Training started…", _loss_frame(job), None, None, gr.update(), gr.update()
            seen, last = -1, 0.0
            try:
                while not job.wait(poll_seconds):
                    step, total = job.progress
                    if len(job.history) != seen and time.monotonic() - last > 0.5:
                        seen, last = len(job.history), time.monotonic()
                        if total:
                            progress((step, total), desc="training", unit="steps")
                        loss = f", loss {job.history[-1].loss:.4f}" if job.history else ""
                        yield jid, f"Step {step}/{total or '?'}{loss}", _loss_frame(job), None, None, \
                            gr.update(), gr.update()
            finally:
                if job.running:  # the page went away or the event was cancelled
                    job.cancel()
            if job.state == "failed":
                raise gr.Error(f"Training failed: {job.error}")
            published = backend.publish_adapter(job)
            step, total = job.progress
            if job.state == "cancelled":
                status = f"Cancelled at step {step}/{total}."
            else:
                status = f"Done: {step}/{total} steps in {job.finished - job.started:.1f} s."
            if published:
                status += f" Adapter saved as `{published.name}` in the adapters folder."
            elif job.state == "done":
                status += " The run produced no adapter file."
            grids = result_paths(job.result)["images"] if job.result is not None else []
            keep = published.relative_to(backend.adapters_dir).as_posix() if published else None
            adapter_out = str(published) if published else None
            yield (jid, status, _loss_frame(job), adapter_out, grids[0] if grids else None,
                   _adapter_choices(backend, keep), _adapter_choices(backend, keep))

        train_btn.click(do_train, [train_images, train_prompt, train_rank, train_steps, train_lr, model],
                        [job_id, train_status, loss_plot, train_file, train_samples, adapter, inspect_choice],
                        api_name="train", concurrency_limit=1)
        cancel_btn.click(lambda jid: backend.cancel_training(jid), job_id, train_status, api_name="cancel_train")
    return demo
