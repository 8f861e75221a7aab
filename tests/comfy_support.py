"""Import a local ComfyUI checkout in tests and run its real LoRA loader.

Opt-in only: ComfyUI is GPL and not on PyPI, so nothing here ships with the
package and no ComfyUI code is copied; we import it from a checkout named by
``COMFYUI_PATH`` (see ``/work/notes/comfy.md``).

Typical use::

    comfy = import_comfy(os.environ["COMFYUI_PATH"])
    model = comfy_model_from_diffusers_unet(unet.state_dict())
    patcher, not_loaded = comfy_load_lora(model, lora_sd, strength=1.0)
    assert not_loaded == []
    w = comfy_patched_weight(patcher, "diffusion_model.input_blocks.1.1.proj_in.weight")

Side effects of :func:`import_comfy` (once per process):

* the checkout is appended to ``sys.path`` (``comfy``, ``comfy_api``, ``nodes``,
  ``folder_paths`` ... become importable; our own ``app`` package still shadows
  ComfyUI's ``app``);
* ComfyUI parses ``['--cpu']`` as its command line, so it never touches a GPU;
* optional packages that our venv lacks (einops, torchvision, torchsde, av, ...)
  are replaced by stub modules in ``sys.modules``; only those whose real import
  fails, and only those ComfyUI's import actually asks for.  A stub's
  attributes are placeholder classes that raise when called, so key mapping and
  weight patching work but e.g. ``einops.rearrange`` in a forward pass does not.
  Stubs carry ``__comfy_support_stub__ = True``.  transformers' cached
  "is torchvision available" checks are evaluated *before* stubbing so that
  transformers keeps seeing the packages as absent.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import types
from typing import Iterator

import torch

# Third-party packages ComfyUI imports unconditionally somewhere on the paths we
# use, that are allowed to be stubbed when missing.  Anything else missing is a
# real error and is raised.
STUBBABLE_ROOTS = frozenset({
    "einops", "torchvision", "torchaudio", "torchsde", "av", "kornia", "spandrel",
    "comfy_aimdo", "comfy_kitchen", "sentencepiece", "pydantic_settings",
    "aiohttp", "yarl", "sqlalchemy", "alembic", "comfyui_frontend_package",
    "comfyui_workflow_templates", "comfyui_embedded_docs",
})

# The modules import_comfy returns, by attribute name.  "nodes" is optional.
_MODULES = {
    "options": "comfy.options",
    "cli_args": "comfy.cli_args",
    "model_management": "comfy.model_management",
    "utils": "comfy.utils",
    "lora": "comfy.lora",
    "lora_convert": "comfy.lora_convert",
    "model_detection": "comfy.model_detection",
    "supported_models": "comfy.supported_models",
    "supported_models_base": "comfy.supported_models_base",
    "model_base": "comfy.model_base",
    "model_patcher": "comfy.model_patcher",
    "sd": "comfy.sd",
    "folder_paths": "folder_paths",
}
_OPTIONAL_MODULES = {"nodes": "nodes"}

_LOADED: types.SimpleNamespace | None = None
STUBBED: list[str] = []  # names of the stub modules installed, in order


# ----------------------------------------------------------------------------
# Stubs
# ----------------------------------------------------------------------------
def _placeholder(qualname: str) -> type:
    """A class usable in annotations / subclassing that raises when used."""

    def _refuse(*args, **kwargs):
        raise RuntimeError(f"{qualname} is a comfy_support stub: the real package is not installed")

    return type(qualname.rsplit(".", 1)[-1], (), {
        "__new__": lambda cls, *a, **k: _refuse(),
        "__class_getitem__": classmethod(lambda cls, item: cls),
        "__module__": qualname.rsplit(".", 1)[0],
        "__comfy_support_stub__": True,
    })


def _install_stub(name: str) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so "import name.sub" works
    module.__comfy_support_stub__ = True
    cache: dict[str, type] = {}

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr not in cache:
            cache[attr] = _placeholder(f"{name}.{attr}")
        return cache[attr]

    module.__getattr__ = __getattr__
    sys.modules[name] = module
    if "." in name:
        parent, child = name.rsplit(".", 1)
        setattr(_install_stub(parent), child, module)
    STUBBED.append(name)
    return module


def _prime_availability_checks() -> None:
    """Let transformers/diffusers record the optional packages as absent first.

    transformers caches ``is_torchvision_available()`` & co. with lru_cache and
    calls ``importlib.util.find_spec``, which raises ValueError on a stub whose
    ``__spec__`` is None; diffusers computes its flags at import time.
    """
    for mod in ("transformers", "diffusers"):
        with contextlib.suppress(ImportError):
            importlib.import_module(mod)
    with contextlib.suppress(ImportError):
        from transformers.utils import import_utils as tiu
        for fn in ("is_vision_available", "is_torchvision_available", "is_torchvision_v2_available",
                   "is_torchaudio_available", "is_av_available", "is_kornia_available",
                   "is_sentencepiece_available"):
            if hasattr(tiu, fn):
                with contextlib.suppress(Exception):
                    getattr(tiu, fn)()


def _import_with_stubs(module_name: str, max_stubs: int = 64):
    """Import ``module_name``, stubbing allowed missing packages as they come up."""
    for _ in range(max_stubs):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if missing.split(".")[0] not in STUBBABLE_ROOTS or missing in sys.modules:
                raise
            _install_stub(missing)
    raise RuntimeError(f"gave up importing {module_name}: more than {max_stubs} stubs needed")


# ----------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------
def import_comfy(path: str | os.PathLike | None = None, extra_args: tuple[str, ...] = ()) -> types.SimpleNamespace:
    """Import ComfyUI from a checkout on a CPU-only machine; idempotent.

    Returns a namespace of modules: ``options, cli_args, model_management,
    utils, lora, lora_convert, model_detection, supported_models,
    supported_models_base, model_base, model_patcher, sd, folder_paths`` and
    ``nodes`` (None when it cannot be imported), plus ``path`` and ``stubbed``.
    ``extra_args`` are extra ComfyUI command-line flags for the first import.
    """
    global _LOADED
    path = os.fspath(path if path is not None else os.environ.get("COMFYUI_PATH", ""))
    if not path or not os.path.isfile(os.path.join(path, "comfy", "lora.py")):
        raise FileNotFoundError(f"not a ComfyUI checkout (no comfy/lora.py): {path!r}")
    path = os.path.realpath(path)
    if _LOADED is not None:
        if _LOADED.path != path:
            raise RuntimeError(f"ComfyUI already imported from {_LOADED.path}, cannot switch to {path}")
        return _LOADED

    # Appended, not prepended: the checkout's top level also holds generic names
    # (app, utils, server, execution, protocol) and our own ``app`` package must
    # keep winning.  ComfyUI's library code never imports its ``app``.
    if path not in sys.path:
        sys.path.append(path)
    _prime_availability_checks()

    saved_argv = sys.argv
    sys.argv = ["comfyui", "--cpu", *extra_args]
    try:
        options = importlib.import_module("comfy.options")
        options.enable_args_parsing()  # comfy.cli_args parses sys.argv only when enabled
        ns = types.SimpleNamespace(path=path)
        for attr, name in _MODULES.items():
            setattr(ns, attr, _import_with_stubs(name))
        for attr, name in _OPTIONAL_MODULES.items():
            try:
                setattr(ns, attr, _import_with_stubs(name))
            except Exception as err:  # noqa: BLE001 - nodes pulls in a lot; report, do not fail
                logging.getLogger(__name__).warning("ComfyUI module %s not importable: %r", name, err)
                setattr(ns, attr, None)
    finally:
        sys.argv = saved_argv
    origin = os.path.realpath(ns.lora.__file__)  # comfy/ is a namespace package: check a module
    if not origin.startswith(path + os.sep):
        raise RuntimeError(f"comfy.lora was imported from {origin}, not from the checkout {path}")
    ns.stubbed = list(STUBBED)
    _LOADED = ns
    return ns


def _comfy() -> types.SimpleNamespace:
    if _LOADED is None:
        return import_comfy()
    return _LOADED


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------
def _count(sd: dict, prefix: str) -> int:
    """Number of consecutive integer indices i with some key starting ``prefix.{i}.``."""
    n = 0
    while any(k.startswith(f"{prefix}.{n}.") for k in sd):
        n += 1
    return n


def unet_config_from_diffusers_state_dict(sd: dict, num_heads: int = 8, num_head_channels: int = -1) -> dict:
    """A ComfyUI ``unet_config`` for any SD-style diffusers UNet2DConditionModel state dict.

    ComfyUI's own ``model_config_from_diffusers_unet`` only recognises exact
    production configs (SD1.5, SD2.1, SDXL, SSD-1B, ...: model_channels 320).
    Head counts do not change any shape, so they are parameters (diffusers'
    SD1.5 ``attention_head_dim=8`` means 8 heads).
    """
    model_channels, in_channels = sd["conv_in.weight"].shape[:2]
    n_down = _count(sd, "down_blocks")
    num_res_blocks, channel_mult, depth_in = [], [], []
    context_dim, linear = None, False
    for i in range(n_down):
        n_res = _count(sd, f"down_blocks.{i}.resnets")
        num_res_blocks.append(n_res)
        channel_mult.append(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] // model_channels)
        for j in range(n_res):
            depth = _count(sd, f"down_blocks.{i}.attentions.{j}.transformer_blocks")
            depth_in.append(depth)
            if depth:
                context_dim = sd[f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2.to_k.weight"].shape[1]
                linear = sd[f"down_blocks.{i}.attentions.{j}.proj_in.weight"].ndim == 2
    depth_out = []
    for i in range(_count(sd, "up_blocks")):
        for j in range(_count(sd, f"up_blocks.{i}.resnets")):
            depth_out.append(_count(sd, f"up_blocks.{i}.attentions.{j}.transformer_blocks"))
    adm = None
    for k in ("class_embedding.linear_1.weight", "add_embedding.linear_1.weight"):
        if k in sd:
            adm = sd[k].shape[1]
    config = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": int(in_channels), "out_channels": int(sd["conv_out.weight"].shape[0]),
        "model_channels": int(model_channels), "num_res_blocks": num_res_blocks,
        "channel_mult": channel_mult, "transformer_depth": depth_in,
        # ComfyUI lists output depths deepest-first reversed: it pops from the end.
        "transformer_depth_output": list(reversed(depth_out)),
        "transformer_depth_middle": _count(sd, "mid_block.attentions.0.transformer_blocks"),
        "context_dim": context_dim, "use_linear_in_transformer": linear,
        "adm_in_channels": adm, "num_heads": num_heads, "num_head_channels": num_head_channels,
        "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": None,
    }
    if adm is not None:
        config["num_classes"] = "sequential"
    return config


def comfy_model_from_diffusers_unet(unet_state_dict: dict, device: torch.device | str | None = None,
                                    load_weights: bool = True, **config_overrides):
    """A ComfyUI model (``comfy.model_base.BaseModel``) for a diffusers UNet state dict.

    First tries ComfyUI's own detection
    (``model_config_from_diffusers_unet(sd).get_model({})``: production configs
    only, e.g. SD1.5 -> ``supported_models.SD15``).  Otherwise it builds the
    config with :func:`unet_config_from_diffusers_state_dict` and uses the
    ``SD15`` model class (``SDXL`` when the UNet has an add/class embedding).

    Device: ComfyUI creates weights uninitialised (``torch.empty``) on ``device``
    (None -> CPU).  When ``load_weights`` and the state dict is not on the meta
    device, the diffusers weights are converted with ComfyUI's own
    ``comfy.utils.unet_to_diffusers`` map and loaded, so the model equals the
    diffusers UNet.  With a meta-device state dict (shapes only) pass
    ``device="meta"``: key maps and ``add_patches`` work, patched weights do not.
    """
    comfy = _comfy()
    sd = dict(unet_state_dict)
    model_config = comfy.model_detection.model_config_from_diffusers_unet(sd) if not config_overrides else None
    if model_config is None:
        unet_config = unet_config_from_diffusers_state_dict(sd)
        unet_config.update(config_overrides)
        cls = comfy.supported_models.SD15 if unet_config["adm_in_channels"] is None else comfy.supported_models.SDXL
        model_config = cls(unet_config)
        # The class' unet_extra_config overwrote the head counts; restore ours.
        for k in ("num_heads", "num_head_channels"):
            model_config.unet_config[k] = unet_config[k]
    model = model_config.get_model({}, device=None if device is None else torch.device(device))
    on_meta = any(t.is_meta for t in sd.values() if isinstance(t, torch.Tensor))
    if load_weights and not on_meta and str(device) != "meta":
        mapping = comfy.utils.unet_to_diffusers(model_config.unet_config)
        ldm_sd = {ldm: sd[diff] for diff, ldm in mapping.items() if diff in sd}
        missing, unexpected = model.diffusion_model.load_state_dict(ldm_sd, strict=False)
        if missing or unexpected or len(ldm_sd) != len(sd):
            unused = sorted(set(sd) - set(mapping))
            raise RuntimeError(f"diffusers -> ComfyUI weight conversion incomplete: missing={missing[:5]}, "
                               f"unexpected={unexpected[:5]}, unmapped diffusers keys={unused[:5]}")
    return model


def _fix_flux_config_from_shapes(cfg: dict, sd: dict) -> None:
    """ComfyUI's Flux detection hard-codes the 12B sizes; read them from the shapes instead."""
    hidden = sd["img_in.weight"].shape[0]
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    b = (head_dim * 7 // 16) // 2 * 2  # rope axes: 16/56/56 for head_dim 128; sum must be head_dim
    cfg.update({
        "hidden_size": hidden, "num_heads": hidden // head_dim,
        "context_in_dim": sd["txt_in.weight"].shape[1],
        "mlp_ratio": sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
        # ComfyUI's Flux always packs 2x2 latent patches into img_in.
        "in_channels": sd["img_in.weight"].shape[1] // 4,
        "out_channels": sd["final_layer.linear.weight"].shape[0] // 4,
        "axes_dim": [head_dim - 2 * b, b, b],
    })


def comfy_model_from_diffusers_transformer(transformer_state_dict: dict, device: torch.device | str | None = None,
                                           load_weights: bool = True):
    """A ComfyUI model for a diffusers SD3 / Flux (/ AuraFlow / PixArt) transformer state dict.

    Uses ComfyUI's own path for diffusers DiTs, as
    ``comfy.sd.load_diffusion_model_state_dict`` does:
    ``comfy.model_detection.convert_diffusers_mmdit`` (renames keys, fuses
    q/k/v) -> ``detect_unet_config`` -> ``model_config_from_unet_config`` ->
    ``get_model``, then loads the converted weights.

    * SD3: detection reads ``depth = hidden_size // 64`` and slices the fused qkv
      at ``depth * 64``, so tiny SD3 models need ``attention_head_dim == 64``
      (e.g. 2 heads -> hidden 128); other sizes fail inside ComfyUI.
    * Flux: detection hard-codes hidden 3072 / 24 heads / context 4096; we
      overwrite those from the tensor shapes so tiny Flux models work too.
    Device as in :func:`comfy_model_from_diffusers_unet`.
    """
    comfy = _comfy()
    sd = dict(transformer_state_dict)
    new_sd = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    if new_sd is None:
        raise ValueError("ComfyUI does not recognise this diffusers transformer (convert_diffusers_mmdit -> None)")
    unet_config = comfy.model_detection.detect_unet_config(new_sd, "")
    if unet_config is None:
        raise ValueError("ComfyUI could not detect the converted transformer's config")
    if unet_config.get("image_model") == "flux":
        _fix_flux_config_from_shapes(unet_config, new_sd)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, new_sd)
    if model_config is None:
        raise ValueError(f"ComfyUI found no model config for {unet_config}")
    model = model_config.get_model(new_sd, "", device=device)
    on_meta = any(t.is_meta for t in new_sd.values() if isinstance(t, torch.Tensor))
    if load_weights and not on_meta and str(device) != "meta":
        missing, unexpected = model.diffusion_model.load_state_dict(new_sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"converted DiT weights do not fit: missing={missing[:5]}, unexpected={unexpected[:5]}")
    return model


# ----------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------
def comfy_key_map(model, clip=None) -> dict:
    """ComfyUI's LoRA-file-key -> model-key map, built like ``comfy.sd.load_lora_for_models``.

    Keys are LoRA module names *without* the ``.lora_down.weight`` / ``.alpha``
    suffix; values are model keys (``diffusion_model.…weight``) or, for fused
    weights (SD3/Flux qkv), tuples ``(model_key, (dim, start, length))``.
    ``model`` may be a BaseModel or a ModelPatcher; ``clip`` a ``comfy.sd.CLIP``.
    """
    comfy = _comfy()
    base = getattr(model, "model", model)
    key_map: dict = {}
    if base is not None:
        key_map = comfy.lora.model_lora_keys_unet(base, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def capture_comfy_warnings() -> Iterator[list[str]]:
    """Collect WARNING+ messages ComfyUI logs through the root logger."""
    handler, root = _Capture(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(min(old_level, logging.WARNING) if old_level else logging.WARNING)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def as_patcher(model):
    """Wrap a BaseModel in a CPU ModelPatcher (a ModelPatcher or None is returned as is)."""
    comfy = _comfy()
    if model is None or isinstance(model, comfy.model_patcher.ModelPatcher):
        return model
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_clip(family: str = "sd1", device: torch.device | str = "meta"):
    """A ComfyUI ``comfy.sd.CLIP`` for ``family`` "sd1" (CLIP-L) or "sdxl" (CLIP-L + CLIP-G).

    Built from ComfyUI's own text-encoder classes with default (full-size)
    configs, on ``device`` ("meta": instant, keys only; "cpu": ~0.5 GB / 2.5 GB
    of uninitialised weights).  Enough for ``comfy_key_map(None, clip)`` and
    ``comfy_load_lora(None, lora, clip=clip)``.
    """
    comfy = _comfy()
    sd1_clip = importlib.import_module("comfy.sd1_clip")
    sdxl_clip = importlib.import_module("comfy.sdxl_clip")
    classes = {"sd1": (sd1_clip.SD1Tokenizer, sd1_clip.SD1ClipModel),
               "sdxl": (sdxl_clip.SDXLTokenizer, sdxl_clip.SDXLClipModel)}
    if family not in classes:
        raise ValueError(f"unknown CLIP family {family!r}; expected one of {sorted(classes)}")
    target = comfy.supported_models_base.ClipTarget(*classes[family])
    cpu = torch.device("cpu")
    return comfy.sd.CLIP(target, model_options={"initial_device": torch.device(device),
                                                "load_device": cpu, "offload_device": cpu})


def comfy_load_lora(model, lora_state_dict: dict, strength: float = 1.0, clip=None, strength_clip: float = 1.0):
    """Run ComfyUI's LoraLoader path: ``comfy.sd.load_lora_for_models``.

    That is what ``nodes.LoraLoader.load_lora`` calls after
    ``comfy.utils.load_torch_file``: ``model_lora_keys_unet`` (+ ``model_lora_keys_clip``)
    -> ``lora_convert.convert_lora`` -> ``lora.load_lora`` -> ``clone().add_patches``.
    ``model``: BaseModel, ModelPatcher or None; ``clip``: ``comfy.sd.CLIP`` or None.

    Returns ``(patcher, not_loaded_keys)``: the patched model clone (the patched
    CLIP clone when ``model`` is None; with both, the CLIP clone is
    ``patcher.comfy_support_clip``) and every key ComfyUI complained about:
    LoRA file keys from "lora key not loaded: <key>" plus model keys from
    "NOT LOADED <key>" (mapped but absent from the model).  ``[]`` means the
    whole file was applied.
    """
    comfy = _comfy()
    patcher = as_patcher(model)
    with capture_comfy_warnings() as messages:
        new_model, new_clip = comfy.sd.load_lora_for_models(
            patcher, clip, dict(lora_state_dict), strength, strength_clip)
    not_loaded = []
    for msg in messages:
        for prefix in ("lora key not loaded: ", "NOT LOADED "):
            if msg.startswith(prefix):
                not_loaded.append(msg[len(prefix):])
    if new_model is None:
        return new_clip, not_loaded
    if new_clip is not None:
        new_model.comfy_support_clip = new_clip
    return new_model, not_loaded


def comfy_patched_weight(patcher, key) -> torch.Tensor:
    """The weight after ComfyUI applies the patcher's patches (an fp32 copy).

    ``key`` is a model key (``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``)
    or a key-map value: for SD3/Flux q/k/v ComfyUI targets a slice of a fused
    weight, ``(model_key, (dim, start, length)[, fn])``, and the slice is returned.
    ``patcher`` may be a ModelPatcher or a ``comfy.sd.CLIP``.

    Uses ComfyUI's own ``ModelPatcher.patch_weight_to_device`` (backup, then
    ``comfy.lora.calculate_weight``) and restores the original weight, so the
    patcher and its model stay untouched.  CPU weights only (not meta).
    """
    comfy = _comfy()
    patcher = getattr(patcher, "patcher", patcher)  # comfy.sd.CLIP -> its ModelPatcher
    offset = None
    if isinstance(key, tuple):
        key, offset = key[0], key[1]
    if key not in patcher.patches:
        raise KeyError(f"no patches for {key!r}; patched keys start with {sorted(patcher.patches)[:5]}")
    weight = comfy.utils.get_attr(patcher.model, key)
    if weight.is_meta:
        raise ValueError(f"{key} is on the meta device: build the model with real weights to read patched values")
    try:
        patcher.patch_weight_to_device(key, device_to=torch.device("cpu"))
        patched = comfy.utils.get_attr(patcher.model, key).detach().to(torch.float32).clone()
    finally:
        backup = patcher.backup.pop(key, None)
        comfy.utils.set_attr_param(patcher.model, key, backup.weight if backup is not None else weight)
    if offset is not None:
        dim, start, length = offset
        patched = patched.narrow(dim, start, length)
    return patched


# ----------------------------------------------------------------------------
# Custom nodes
# ----------------------------------------------------------------------------
def comfy_load_custom_node(path: str | os.PathLike) -> dict:
    """Load a custom node pack (a directory with ``__init__.py``, or a ``.py`` file)
    the way ComfyUI does at startup (``nodes.load_custom_node``), and return the
    ``{node_id: class}`` entries it added to ``nodes.NODE_CLASS_MAPPINGS``.

    ComfyUI swallows import errors into log warnings and returns False; here
    they are raised as RuntimeError with the captured messages.  The pack may
    define V1 ``NODE_CLASS_MAPPINGS`` or a V3 ``comfy_entrypoint`` (sync or async)
    returning a ``ComfyExtension``.  Loading the same path twice re-executes it.
    """
    import asyncio

    comfy = _comfy()
    if comfy.nodes is None:
        raise RuntimeError("ComfyUI's nodes module could not be imported")
    before = dict(comfy.nodes.NODE_CLASS_MAPPINGS)
    with capture_comfy_warnings() as messages:
        ok = asyncio.run(comfy.nodes.load_custom_node(os.fspath(path)))
    if not ok:
        raise RuntimeError(f"ComfyUI failed to load {path}:\n" + "\n".join(messages))
    return {k: v for k, v in comfy.nodes.NODE_CLASS_MAPPINGS.items() if before.get(k) is not v}
