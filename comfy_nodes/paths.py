"""File names a ComfyUI user typed, resolved only inside ComfyUI's own folders.

Node inputs carry names relative to a ComfyUI folder (``models/loras``,
``models/diffusers``, ``input``), as ComfyUI's dropdowns show them
(``sub/x.safetensors``). Absolute paths, drive letters, ``..`` and empty parts
are refused before the file system is touched, so a workflow cannot read or write
outside those folders. Symlinks that the user put *inside* a folder are followed,
as ComfyUI itself does.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

__all__ = ["NodeInputError", "LORA_EXTENSIONS", "clean_relative_name", "resolve_file", "resolve_dir",
           "list_files", "output_file"]

#: what the Riemann nodes read and write: safetensors only (never pickles).
LORA_EXTENSIONS = (".safetensors", ".sft")
_DRIVE = re.compile(r"^[A-Za-z]:")


class NodeInputError(ValueError):
    """A node input a ComfyUI user can fix; the message says what and how."""


def clean_relative_name(name: str, what: str = "file name") -> str:
    """``name`` as a normalised relative POSIX path, or NodeInputError.

    Accepts ``x.safetensors`` and ``sub/x.safetensors`` (``\\`` counts as ``/``);
    refuses empty names, absolute paths, drive letters, ``..`` and NUL bytes.
    """
    if not isinstance(name, str) or not name.strip():
        raise NodeInputError(f"{what} is empty; pick one from the list")
    raw = name.strip().replace("\\", "/")
    if "\0" in raw or raw.startswith("/") or _DRIVE.match(raw):
        raise NodeInputError(f"{what} {name!r} must be relative to the ComfyUI folder, not an absolute path")
    parts = [p for p in PurePosixPath(raw).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise NodeInputError(f"{what} {name!r} may not contain '..'; it must stay inside the ComfyUI folder")
    return "/".join(parts)


def _inside(path: Path, root: Path) -> bool:
    # Lexical check (no symlink resolution): the name was cleaned, so this guards
    # against anything the cleaning missed without forbidding user-made symlinks.
    root_s, path_s = os.path.normpath(root), os.path.normpath(path)
    return os.path.commonpath([root_s, path_s]) == root_s


def resolve_file(name: str, folders: Sequence[str | os.PathLike], extensions: Iterable[str] = LORA_EXTENSIONS,
                 what: str = "LoRA file") -> Path:
    """The existing file ``name`` inside the first of ``folders`` that has it.

    Raises NodeInputError for unsafe names, other extensions (naming the allowed
    ones) and missing files (naming the folders searched).
    """
    rel = clean_relative_name(name, what)
    exts = tuple(e.lower() for e in extensions)
    if exts and not rel.lower().endswith(exts):
        raise NodeInputError(f"{what} {name!r} is not one of {', '.join(exts)}; the Riemann nodes read "
                             "safetensors only (use ComfyUI's own LoraLoader for other formats)")
    return _first_inside(name, rel, folders, what, Path.is_file)


def resolve_dir(name: str, folders: Sequence[str | os.PathLike], what: str = "folder") -> Path:
    """The existing directory ``name`` inside one of ``folders`` (same rules as files)."""
    return _first_inside(name, clean_relative_name(name, what), folders, what, Path.is_dir)


def _first_inside(name: str, rel: str, folders, what: str, exists) -> Path:
    """``folder/rel`` for the first folder where it stays inside and ``exists(path)``."""
    for folder in folders:
        root = Path(folder)
        path = root / rel
        if _inside(path, root) and exists(path):
            return path
    searched = ", ".join(str(f) for f in folders) or "(no folders configured)"
    raise NodeInputError(f"{what} {name!r} was not found in {searched}")


def list_files(folders: Sequence[str | os.PathLike], extensions: Iterable[str] = LORA_EXTENSIONS) -> list[str]:
    """Sorted relative names (``sub/x.safetensors``) of matching files under ``folders``."""
    exts = tuple(e.lower() for e in extensions)
    found: set[str] = set()
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                if fn.lower().endswith(exts):
                    found.add(Path(dirpath, fn).relative_to(root).as_posix())
    return sorted(found)


def output_file(name: str, folder: str | os.PathLike, overwrite: bool = False, suffix: str = ".safetensors") -> Path:
    """Where to write ``name`` inside ``folder`` (``suffix`` appended when missing).

    Creates sub-folders; raises NodeInputError when the file exists and
    ``overwrite`` is false.
    """
    rel = clean_relative_name(name, "output name")
    if not rel.lower().endswith(LORA_EXTENSIONS):
        rel += suffix
    root = Path(folder)
    path = root / rel
    if not _inside(path, root):
        raise NodeInputError(f"output name {name!r} leaves the folder {root}")
    if path.exists() and not overwrite:
        raise NodeInputError(f"{rel!r} already exists in {root}; choose another name or enable overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
