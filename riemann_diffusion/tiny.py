"""Tiny random-weight diffusers models and pipelines, built fully offline.

For tests, benchmarks and the offline default run: nothing here touches the
Hugging Face hub. Every builder is deterministic given ``seed`` (weights are drawn
inside a forked RNG, so the caller's global torch RNG is left untouched) and takes
milliseconds. Configurations mirror diffusers' own test dummies (``get_dummy_components``
in tests/pipelines/...), except that every tiny VAE has four blocks, so its scale
factor is 8 as in the real models: a 64x64 image gives an 8x8 latent.

Tokenizers are built from scratch: a byte-level BPE CLIP tokenizer written to a
folder (``make_tokenizer_dir``) and a small Unigram T5 tokenizer held in memory
(transformers 5's ``T5Tokenizer(vocab=[(piece, score), ...])``). Both save and reload
with ``save_pretrained`` / ``from_pretrained``.
"""
from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

CLIP_MAX_LENGTH = 77
_CLIP_MERGES = ("t h", "th e</w>", "i n", "e r", "a n", "o n", "o r", "r e", "a t", "e n")
_T5_WORDS = ("a", "photo", "of", "sks", "toy", "dog", "cat", "on", "the", "in", "with", "and", "painting")
PIPELINE_KINDS = ("sd15", "sdxl", "sd3", "flux")


@contextmanager
def _seeded(seed: int):
    """Draw weights from ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (256 entries)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


# --------------------------------------------------------------------------- tokenizers
def make_tokenizer_dir(path) -> Path:
    """Write an offline byte-level CLIP tokenizer folder (vocab.json + merges.txt).

    The vocabulary holds the 256 byte-unicode characters, the same with ``</w>``, the
    merged tokens of ``_CLIP_MERGES``, then ``<|startoftext|>`` and ``<|endoftext|>``
    (about 524 entries). Load it with ``CLIPTokenizer.from_pretrained(path,
    model_max_length=77)``; transformers 5 ignores ``vocab_file=``/``merges_file=``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m.split()) for m in _CLIP_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_CLIP_MERGES) + "\n", encoding="utf-8")
    return path


def make_clip_tokenizer():
    """A ``CLIPTokenizer`` loaded from a temporary ``make_tokenizer_dir`` folder."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(make_tokenizer_dir(tmp), model_max_length=CLIP_MAX_LENGTH)


def make_t5_tokenizer():
    """A small Unigram ``T5Tokenizer`` (pad=0, </s>=1, unk=2), built in memory.

    Pieces: ``▁``, ASCII letters/digits/punctuation with and without the ``▁`` prefix,
    and a few whole words. No sentinel ``<extra_id_*>`` tokens.
    """
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in _T5_WORDS]
    vocab += [("▁" + c, -5.0) for c in chars] + [(c, -6.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


# --------------------------------------------------------------------------- UNets
def _unet_sd15() -> dict:
    # diffusers' StableDiffusion test dummy (1.43M params) with an 8x8 default latent.
    return dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32, attention_head_dim=8)


def _unet_sdxl() -> dict:
    # diffusers' SDXL test dummy: text_time conditioning, pooled 32 + 6 time ids x 8.
    return dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                projection_class_embeddings_input_dim=80, cross_attention_dim=64)


def _unet_small() -> dict:
    # Benchmark model (18.2M params): SD1.5's layout at a quarter of its width.
    return dict(block_out_channels=(64, 128, 256), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=256, attention_head_dim=8)


_UNET_CONFIGS = {"sd15": _unet_sd15, "sdxl": _unet_sdxl, "small": _unet_small}


def tiny_unet_config(kind: str = "sd15") -> dict:
    """Constructor kwargs of a tiny ``UNet2DConditionModel``: "sd15", "sdxl" or "small"."""
    if kind not in _UNET_CONFIGS:
        raise ValueError(f"unknown UNet kind {kind!r}; expected one of {sorted(_UNET_CONFIGS)}")
    return _UNET_CONFIGS[kind]()


def sd15_full_unet_config() -> dict:
    """The published Stable Diffusion 1.5 UNet config (860M params; ~12 s and 3.6 GiB to build)."""
    return dict(
        act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
        center_input_sample=False, cross_attention_dim=768,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
        mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    )


def make_tiny_unet(kind: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight ``UNet2DConditionModel`` from ``tiny_unet_config(kind)``, in eval mode."""
    from diffusers import UNet2DConditionModel

    config = tiny_unet_config(kind)
    with _seeded(seed):
        unet = UNet2DConditionModel(**config)
    if dtype != torch.float32:  # .to() warns even when nothing changes
        unet = unet.to(dtype)
    return unet.eval()


# --------------------------------------------------------------------------- other parts
def _tiny_vae(seed: int, latent_channels: int = 4, **extra):
    """Four-block AutoencoderKL (248k params), scale factor 8."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3,
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             latent_channels=latent_channels, norm_num_groups=8, sample_size=64, **extra).eval()


def _tiny_clip(tokenizer, seed: int, projection: bool = False, hidden_size: int = 32):
    """CLIPTextModel (or ...WithProjection, projection_dim 32) matching ``tokenizer``'s ids."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hidden_size=hidden_size,
                            intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5,
                            hidden_act="gelu", projection_dim=32, max_position_embeddings=CLIP_MAX_LENGTH)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with _seeded(seed):
        return cls(config).eval()


def _tiny_t5(tokenizer, seed: int, d_model: int):
    """T5EncoderModel sized like hf-internal-testing/tiny-random-t5 (2 layers)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                      relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    with _seeded(seed):
        return T5EncoderModel(config).eval()


def _sd_scheduler(kind: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if kind == "sdxl":
        return EulerDiscreteScheduler(timestep_spacing="leading", **common)
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)


# --------------------------------------------------------------------------- pipelines
def make_tiny_sd_pipeline(kind: str = "sd15", seed: int = 0):
    """A ``StableDiffusionPipeline`` ("sd15") or ``StableDiffusionXLPipeline`` ("sdxl").

    Tiny UNet (``make_tiny_unet(kind)``), tiny four-block VAE, tiny CLIP text encoder(s)
    with the offline tokenizer, DDIM (sd15) or EulerDiscrete (sdxl) scheduler, no safety
    checker. Default resolution 64x64 (8x8 latents).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"unknown SD pipeline kind {kind!r}; expected 'sd15' or 'sdxl'")
    tokenizer = make_clip_tokenizer()
    parts = dict(unet=make_tiny_unet(kind, seed), vae=_tiny_vae(seed + 1), scheduler=_sd_scheduler(kind),
                 tokenizer=tokenizer, text_encoder=_tiny_clip(tokenizer, seed + 2))
    if kind == "sd15":
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        tokenizer_2 = make_clip_tokenizer()
        pipe = StableDiffusionXLPipeline(**parts, tokenizer_2=tokenizer_2,
                                         text_encoder_2=_tiny_clip(tokenizer_2, seed + 3, projection=True),
                                         force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_sd3_pipeline(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` with a one-layer ``SD3Transformer2DModel``.

    Mirrors diffusers' SD3 test dummy, made self-consistent: two CLIP-with-projection
    encoders (hidden 32 each, so 64 concatenated and pooled), a tiny T5 encoder of width
    64 = ``joint_attention_dim`` with the offline Unigram tokenizer, patch size 1,
    8x8 latents at 64x64. Pass ``max_sequence_length=16`` to keep T5 short.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
            pos_embed_max_size=32).eval()
    tok, tok_2, tok_3 = make_clip_tokenizer(), make_clip_tokenizer(), make_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(seed + 1, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                      use_post_quant_conv=False),
        text_encoder=_tiny_clip(tok, seed + 2, projection=True), tokenizer=tok,
        text_encoder_2=_tiny_clip(tok_2, seed + 3, projection=True), tokenizer_2=tok_2,
        text_encoder_3=_tiny_t5(tok_3, seed + 4, d_model=64), tokenizer_3=tok_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_flux_pipeline(seed: int = 0):
    """A ``FluxPipeline`` with a one-double/one-single-block ``FluxTransformer2DModel``.

    Mirrors diffusers' Flux test dummy (heads 2 x 16, rope axes [4, 4, 8], CLIP pooled 32,
    T5 width 32), but with a four-channel, scale-8 VAE: a 64x64 image is an 8x8 latent
    packed into 16 tokens of 16 channels. Pass ``max_sequence_length=16`` to keep T5 short,
    and always pass ``height``/``width``: FluxPipeline hard-codes a 1024x1024 default.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    tok, tok_2 = make_clip_tokenizer(), make_t5_tokenizer()
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(seed + 1, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                      use_post_quant_conv=False),
        text_encoder=_tiny_clip(tok, seed + 2), tokenizer=tok,
        text_encoder_2=_tiny_t5(tok_2, seed + 4, d_model=32), tokenizer_2=tok_2,
        image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_PIPELINE_BUILDERS = {
    "sd15": lambda seed: make_tiny_sd_pipeline("sd15", seed),
    "sdxl": lambda seed: make_tiny_sd_pipeline("sdxl", seed),
    "sd3": make_tiny_sd3_pipeline,
    "flux": make_tiny_flux_pipeline,
}


def make_tiny_pipeline(kind: str, seed: int = 0):
    """Dispatch to the builder of ``kind`` ("sd15", "sdxl", "sd3" or "flux")."""
    if kind not in _PIPELINE_BUILDERS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {list(PIPELINE_KINDS)}")
    return _PIPELINE_BUILDERS[kind](seed)


def save_tiny_pipeline(kind: str, path, seed: int = 0) -> Path:
    """Build ``make_tiny_pipeline(kind, seed)`` and ``save_pretrained`` it (safetensors) to ``path``.

    The folder reloads with ``DiffusionPipeline.from_pretrained(path, local_files_only=True)``
    and gives the same outputs as the in-memory pipeline.
    """
    path = Path(path)
    make_tiny_pipeline(kind, seed).save_pretrained(path, safe_serialization=True)
    return path
