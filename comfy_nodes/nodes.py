"""The Riemann LoRA nodes (ComfyUI V3 schema).

Each node is stateless: ``define_schema`` declares inputs and outputs (the
file dropdowns are re-read every time ComfyUI asks), ``execute`` resolves file
names inside ComfyUI's folders (:mod:`comfy_nodes.paths`) and calls
:mod:`comfy_nodes.logic`. ComfyUI modules (``folder_paths``, ``comfy.*``) are
imported inside the functions that need them, so importing this module costs
nothing and works without ComfyUI (with the stand-in API of ``_compat``).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ._compat import io
from .paths import LORA_EXTENSIONS, NodeInputError, list_files, output_file, resolve_dir, resolve_file

logger = logging.getLogger(__name__)

__all__ = ["RiemannLoraLoader", "RiemannLoraInspect", "RiemannLoraResize", "RiemannLoraBlend", "RiemannLoraTrain",
           "NODES"]

CATEGORY = "Riemann LoRA"
_FORMATS = ["same", "auto", "kohya", "peft", "diffusers"]


# ----------------------------------------------------------------------------- ComfyUI folders
def _folders(kind: str) -> list[str]:
    """ComfyUI's folders for ``kind`` ("loras", "diffusers"); [] outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return []
    try:
        return list(folder_paths.get_folder_paths(kind))
    except KeyError:
        return []


def _lora_choices() -> list[str]:
    """The dropdown: safetensors files under ComfyUI's ``loras`` folders."""
    try:
        import folder_paths

        names = folder_paths.get_filename_list("loras")
        return [n for n in names if n.lower().endswith(LORA_EXTENSIONS)]
    except (ImportError, KeyError):
        return list_files(_folders("loras"))


def _lora_path(name: str) -> Path:
    return resolve_file(name, _folders("loras"), what="LoRA file")


def _output_path(name: str, overwrite: bool) -> Path:
    folders = _folders("loras")
    if not folders:
        raise NodeInputError("ComfyUI has no 'loras' folder configured to save into")
    return output_file(name, folders[0], overwrite=overwrite)


def _lora_combo(id: str = "lora_name", tooltip: str = "A .safetensors file from ComfyUI's models/loras folder."):
    return io.Combo.Input(id, options=_lora_choices(), tooltip=tooltip)


def _output_inputs(default_name: str) -> list:
    return [
        io.String.Input("output_name", default=default_name,
                        tooltip="File name inside models/loras (sub-folders allowed, '.safetensors' added)."),
        io.Combo.Input("format", options=_FORMATS, default="same",
                       tooltip="same: the input's format; auto: kohya for SD/SDXL UNets, PEFT names for DiTs."),
        io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
    ]


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


# ----------------------------------------------------------------------------- Loader
def _apply_lora(model, clip, path: Path, strength_model: float, strength_clip: float, strict: bool):
    """Check and convert the file, then patch clones through ComfyUI's own LoRA code."""
    import comfy.lora
    import comfy.sd

    from . import logic

    base = model.model
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()})
    model_name = type(getattr(base, "model_config", base)).__name__
    result, info = logic.comfy_lora_for_file(path, key_map, shapes.__getitem__, clip_connected=clip is not None,
                                             strict=strict, model_name=model_name)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, result.state_dict, strength_model,
                                                        strength_clip)
    return new_model, new_clip, result, info


class RiemannLoraLoader(io.ComfyNode):
    """Apply a Riemann (or kohya/PEFT) LoRA with ComfyUI's own patching."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RiemannLoraLoader",
            display_name="Riemann LoRA Loader",
            category=CATEGORY,
            description=("Applies a LoRA from models/loras to MODEL (and CLIP when connected) with ComfyUI's own "
                         "patching, so it stacks with other LoRA loaders. Reads riemann-diffusion files, training "
                         "states and ordinary kohya/PEFT files, and stops with a clear message when the file is "
                         "for another model or corrupt instead of silently skipping layers."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch."),
                _lora_combo(),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the LoRA update on the diffusion model."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the LoRA update on the text encoder (when CLIP is connected)."),
                io.Boolean.Input("strict", default=True,
                                 tooltip="Stop when some LoRA layers do not exist in the model (off: apply the "
                                         "layers that fit and list the rest in 'info')."),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder; needed for text-encoder layers."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
                io.String.Output(display_name="info"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        try:
            return _file_fingerprint(_lora_path(lora_name))
        except NodeInputError:
            return lora_name

    @classmethod
    def execute(cls, model, lora_name, strength_model=1.0, strength_clip=1.0, strict=True, clip=None):
        path = _lora_path(lora_name)
        if strength_model == 0 and (clip is None or strength_clip == 0):
            return io.NodeOutput(model, clip, f"{lora_name}: strength 0, nothing applied")
        new_model, new_clip, result, info = _apply_lora(model, clip, path, strength_model, strength_clip, strict)
        text = (f"{lora_name}: {info['format']} LoRA for {info['family']}"
                + (f", rank {info['rank']}" if info.get("rank") else "") + f"; {result.summary()}")
        logger.info(text)
        return io.NodeOutput(new_model, new_clip if clip is not None else None, text)


# ----------------------------------------------------------------------------- Inspect
class RiemannLoraInspect(io.ComfyNode):
    """Rank, targets, provenance and singular-value spectra of a LoRA file."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RiemannLoraInspect",
            display_name="Riemann LoRA Inspect",
            category=CATEGORY,
            description="Shows a LoRA's format, model family, rank, targets and provenance, and draws the singular "
                        "values of every layer's update, one panel per layer group.",
            inputs=[
                _lora_combo(),
                io.Int.Input("image_width", default=768, min=256, max=2048, step=64,
                             tooltip="Width of the spectrum image in pixels."),
            ],
            outputs=[
                io.String.Output(display_name="report"),
                io.Image.Output(display_name="spectrum"),
                io.Int.Output(display_name="rank"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        try:
            return _file_fingerprint(_lora_path(lora_name)) + f":{kwargs.get('image_width')}"
        except NodeInputError:
            return lora_name

    @classmethod
    def execute(cls, lora_name, image_width=768):
        from . import logic
        from .spectrum import spectrum_image

        path = _lora_path(lora_name)
        lora = logic.read_adapter(path)
        summary = logic.summarize(lora, lora_name)
        image = spectrum_image(logic.spectrum_groups(lora), title=f"{lora_name}: singular values of ΔW per layer",
                               width=image_width)
        return io.NodeOutput(summary.text(), image, int(summary.rank))


# ----------------------------------------------------------------------------- Resize
class RiemannLoraResize(io.ComfyNode):
    """Truncate a LoRA to a smaller rank by exact SVD and save it."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RiemannLoraResize",
            display_name="Riemann LoRA Resize",
            category=CATEGORY,
            description="Keeps the top singular directions of every layer (the best approximation of that rank) and "
                        "saves the smaller LoRA to models/loras, reporting the relative error it made.",
            is_output_node=True,
            inputs=[
                _lora_combo(),
                io.Int.Input("rank", default=4, min=1, max=1024, tooltip="New rank (at most the file's rank)."),
                *_output_inputs("resized/lora_resized"),
            ],
            outputs=[
                io.String.Output(display_name="info"),
                io.Float.Output(display_name="relative_error"),
            ],
        )

    @classmethod
    def execute(cls, lora_name, rank, output_name, format="same", overwrite=False):
        from . import logic

        src = _lora_path(lora_name)
        out = _output_path(output_name, overwrite)
        path, rel, info = logic.resize_file(src, rank, out, format)
        name = path.relative_to(Path(_folders("loras")[0])).as_posix()
        text = (f"saved {name}: rank {info['rank']}, {info['layers']} layers, {info['format']}; relative error "
                f"‖ΔW − ΔW_r‖/‖ΔW‖ = {logic.relative_error_text(rel)}")
        return io.NodeOutput(text, float(rel))


# ----------------------------------------------------------------------------- Blend
class RiemannLoraBlend(io.ComfyNode):
    """weight_a · A + weight_b · B for two LoRAs of the same base model, saved as one exact file."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RiemannLoraBlend",
            display_name="Riemann LoRA Blend",
            category=CATEGORY,
            description="Saves weight_a·ΔW_a + weight_b·ΔW_b as one LoRA (exact: the ranks add up). Both files must "
                        "be for the same base model.",
            is_output_node=True,
            inputs=[
                _lora_combo("lora_a", "First LoRA (models/loras)."),
                _lora_combo("lora_b", "Second LoRA (models/loras), same base model."),
                io.Float.Input("weight_a", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Float.Input("weight_b", default=1.0, min=-10.0, max=10.0, step=0.01),
                *_output_inputs("blended/lora_blend"),
            ],
            outputs=[io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(cls, lora_a, lora_b, weight_a, weight_b, output_name, format="same", overwrite=False):
        from . import logic

        src_a, src_b = _lora_path(lora_a), _lora_path(lora_b)
        out = _output_path(output_name, overwrite)
        path, info = logic.blend_files(src_a, src_b, weight_a, weight_b, out, format)
        name = path.relative_to(Path(_folders("loras")[0])).as_posix()
        return io.NodeOutput(f"saved {name}: {info['family']} LoRA, rank {info['rank']}, {info['layers']} layers "
                             f"({info['shared_layers']} shared), {info['format']}")


# ----------------------------------------------------------------------------- Train
def _base_model(name: str) -> str:
    from . import logic

    name = (name or "tiny").strip()
    if name in logic.TINY_BASES:
        return name
    return str(resolve_dir(name, _folders("diffusers"), what="diffusers model folder"))


def _images_dir(name: str) -> Path | None:
    if not (name or "").strip():
        return None
    try:
        import folder_paths

        roots = [folder_paths.get_input_directory()]
    except ImportError:
        roots = []
    return resolve_dir(name, roots, what="image folder")


class RiemannLoraTrain(io.ComfyNode):
    """A short subject training with Riemannion, saved to models/loras."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RiemannLoraTrain",
            display_name="Riemann LoRA Train",
            category=CATEGORY,
            description=("Trains a LoRA on a folder of subject photos with the Riemannion optimizer and saves it to "
                         "models/loras. Needs a diffusers-format base model (a folder in models/diffusers) because "
                         "ComfyUI's MODEL objects are not diffusers pipelines; 'tiny' trains the built-in offline "
                         "toy model (for trying the workflow)."),
            is_output_node=True,
            is_experimental=True,
            inputs=[
                io.String.Input("base_model", default="tiny",
                                tooltip="'tiny', 'tiny-sdxl', 'tiny-sd3', 'tiny-flux', or a diffusers pipeline "
                                        "folder inside models/diffusers (e.g. 'stable-diffusion-v1-5')."),
                io.String.Input("images_folder", default="",
                                tooltip="Folder of subject photos inside ComfyUI's input folder; empty: the "
                                        "bundled example images."),
                io.String.Input("prompt", default="a photo of sks toy",
                                tooltip="Instance prompt with a rare token for the subject."),
                io.Int.Input("steps", default=100, min=1, max=20000, tooltip="Optimizer steps."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="Adapter rank r (the saved LoRA has 2r)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=10.0, step=0.0001,
                               tooltip="0: the optimizer's default (heavy-ball 0.1, Muon 0.02)."),
                io.Combo.Input("rule", options=["heavy_ball", "muon"], default="heavy_ball",
                               tooltip="Riemannion update rule."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.String.Input("output_name", default="riemann/subject",
                                tooltip="File name inside models/loras ('.safetensors' added)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
            ],
            outputs=[
                io.String.Output(display_name="info"),
                io.Image.Output(display_name="loss_curve"),
            ],
        )

    @classmethod
    def execute(cls, base_model, images_folder, prompt, steps, rank, learning_rate, rule, seed, output_name,
                overwrite=False):
        import comfy.model_management as mm
        import comfy.utils
        import torch

        from . import logic

        base = _base_model(base_model)
        images = _images_dir(images_folder)
        out = _output_path(output_name, overwrite)
        mm.unload_all_models()  # give the training the accelerator memory ComfyUI holds
        bar = comfy.utils.ProgressBar(int(steps))

        def progress(step, total, loss, lr):
            bar.update_absolute(step, total)
            return not mm.processing_interrupted()

        try:
            import folder_paths

            temp_root = folder_paths.get_temp_directory()
            os.makedirs(temp_root, exist_ok=True)
        except ImportError:
            temp_root = None
        with tempfile.TemporaryDirectory(prefix="riemann_train_", dir=temp_root) as work:
            info = logic.train_subject(base, images, prompt, steps, rank, out, Path(work),
                                       lr=learning_rate or None, rule=rule, seed=seed, progress=progress)
            curve = logic.image_file_tensor(info["loss_plot"])
        if info["cancelled"]:
            mm.throw_exception_if_processing_interrupted()
            raise NodeInputError(f"training stopped after {info['steps']} steps; nothing was saved")
        if curve is None:
            curve = torch.zeros(1, 64, 64, 3)
        name = info["path"].relative_to(Path(_folders("loras")[0])).as_posix()
        text = (f"saved {name}: {info['steps']} steps in {info['seconds']:.1f} s, final loss "
                f"{info['final_loss']:.4f}")
        return io.NodeOutput(text, curve)


NODES = [RiemannLoraLoader, RiemannLoraInspect, RiemannLoraResize, RiemannLoraBlend, RiemannLoraTrain]
