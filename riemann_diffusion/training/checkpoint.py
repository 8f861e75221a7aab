"""Resumable training checkpoints, written atomically.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000100/`` with

- ``adapter_state.safetensors``: ``riemann_diffusion.state.adapter_state`` (A_L, B, A0, B0
  of every adapter) plus provenance metadata;
- ``optimizer.safetensors``: each adapter tensor's momentum buffer and step count,
  and torch's global RNG state;
- ``trainer_state.json``: step, samples seen (the data order follows from it), the
  config, Python's RNG state. Written last.

The folder is built under a temporary name in the same directory and renamed into
place (``os.replace``), so a run killed at any moment leaves either the previous
complete checkpoint or the new complete one. Only tensors and JSON are stored:
loading never unpickles.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..state import adapter_state, encode_metadata, load_adapter_state_into

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS", "save_checkpoint", "load_checkpoint", "list_checkpoints", "resolve_resume",
           "ADAPTER_FILE"]

CHECKPOINTS = "checkpoints"
ADAPTER_FILE = "adapter_state.safetensors"
_OPTIM_FILE = "optimizer.safetensors"
_STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with trainer_state.json) as (step, folder), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / _STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(output_dir, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from: None, ``"latest"`` (None if there is none) or a path."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            logger.warning("resume='latest' but %s has no checkpoint; starting from step 0",
                           Path(output_dir) / CHECKPOINTS)
            return None
        return ckpts[-1][1]
    path = Path(resume)
    if not (path / _STATE_FILE).is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a complete checkpoint folder (no {_STATE_FILE}); "
                                f"use 'latest' or one of {[str(p) for _, p in list_checkpoints(output_dir)]}")
    return path


def _optimizer_tensors(optimizer, param_keys: list[str]) -> dict[str, torch.Tensor]:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(params) != len(param_keys):
        raise ValueError(f"{len(param_keys)} parameter keys for {len(params)} optimizer parameters")
    out = {}
    for key, p in zip(param_keys, params):
        for name, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"{key}.{name}"] = value.detach().cpu().contiguous()
    out["rng.torch"] = torch.get_rng_state()
    return out


def save_checkpoint(output_dir, step: int, components: dict, optimizer, param_keys: list[str],
                    trainer_state: dict, limit: int = 0, metadata: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically; then delete the oldest beyond ``limit`` (0 = keep all)."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.cpu() for k, v in adapter_state(components).items()}
    save_file(state, tmp / ADAPTER_FILE, metadata=encode_metadata({**(metadata or {}), "step": step}))
    save_file(_optimizer_tensors(optimizer, param_keys), tmp / _OPTIM_FILE)
    full = {**trainer_state, "step": step, "python_rng": _py_rng_to_json(random.getstate())}
    (tmp / _STATE_FILE).write_text(json.dumps(full, indent=1, default=str), encoding="utf-8")
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # e.g. re-saving the same step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    if limit:
        for _, old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(path, components: dict, optimizer, param_keys: list[str]) -> dict:
    """Restore adapters, optimizer state and RNG from ``path``; returns trainer_state (with ``step``)."""
    path = Path(path)
    load_adapter_state_into(components, load_file(path / ADAPTER_FILE))
    tensors = load_file(path / _OPTIM_FILE)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(params) != len(param_keys):
        raise ValueError(f"{len(param_keys)} parameter keys for {len(params)} optimizer parameters")
    for key, p in zip(param_keys, params):
        st = {name.rsplit(".", 1)[-1]: t for name, t in
              ((k, v) for k, v in tensors.items() if k.rsplit(".", 1)[0] == key)}
        if st:
            optimizer.state[p] = {n: (t.to(p.device) if t.ndim else t) for n, t in st.items()}
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    state = json.loads((path / _STATE_FILE).read_text(encoding="utf-8"))
    if "python_rng" in state:
        random.setstate(_py_rng_from_json(state["python_rng"]))
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state


def _py_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(data):
    version, internal, gauss = data
    return version, tuple(internal), gauss
