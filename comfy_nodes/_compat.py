"""ComfyUI's V3 node API (``comfy_api.latest``), or a small stand-in outside ComfyUI.

Inside ComfyUI this module re-exports the real ``io`` and ``ComfyExtension``.
Outside it (the CI logic tests, older ComfyUI builds without ``comfy_api``) it
provides just the part of that API our nodes use, written here from the public
V3 documentation (no ComfyUI code is copied):

* ``io.Schema`` / ``io.<Type>.Input`` / ``io.<Type>.Output`` record a node's
  declaration, so tests can read node ids, input names and types;
* ``io.ComfyNode`` derives the V1 view ComfyUI has used since 2023
  (``INPUT_TYPES``, ``RETURN_TYPES``, ``RETURN_NAMES``, ``FUNCTION``,
  ``CATEGORY``, ``OUTPUT_NODE``, ``DESCRIPTION``) from ``define_schema``, so an
  old ComfyUI can still run the nodes through ``NODE_CLASS_MAPPINGS``.

``HAVE_COMFY_API`` says which one is in use.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any

__all__ = ["HAVE_COMFY_API", "io", "ComfyExtension"]

try:  # the real API, inside ComfyUI
    from comfy_api.latest import ComfyExtension, io  # type: ignore[import-not-found]

    HAVE_COMFY_API = True
except ImportError:
    HAVE_COMFY_API = False

    class _Input:
        """An input declaration: ``id`` plus the widget options ComfyUI shows."""

        io_type = "*"

        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, **options: Any):
            self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
            self.options = {k: v for k, v in options.items() if v is not None}

        def as_v1(self) -> tuple:
            opts = dict(self.options)
            if self.tooltip:
                opts["tooltip"] = self.tooltip
            if self.io_type == "COMBO":
                return (list(opts.pop("options", [])), opts)
            return (self.io_type, opts)

    class _Output:
        io_type = "*"

        def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                     is_output_list: bool = False):
            self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list

    def _io_type(name: str, io_type: str) -> type:
        """A namespace class with nested ``Input``/``Output`` like ``io.Float``."""
        inp = type("Input", (_Input,), {"io_type": io_type})
        out = type("Output", (_Output,), {"io_type": io_type})
        return type(name, (), {"io_type": io_type, "Input": inp, "Output": out})

    @dataclasses.dataclass
    class Schema:
        node_id: str
        display_name: str | None = None
        category: str = "sd"
        inputs: list = dataclasses.field(default_factory=list)
        outputs: list = dataclasses.field(default_factory=list)
        hidden: list | None = None
        description: str = ""
        is_output_node: bool = False
        is_experimental: bool = False
        not_idempotent: bool = False

    class NodeOutput:
        def __init__(self, *args: Any, ui: Any = None):
            self.args, self.ui = args, ui

        @property
        def result(self):
            return self.args if self.args else None

    class _SchemaProperty:
        """Class attribute computed from ``define_schema()`` on every access (fresh combos)."""

        def __init__(self, fn):
            self.fn = fn

        def __get__(self, obj, cls):
            return self.fn(cls, cls.define_schema())

    class ComfyNode:
        """Base class: subclasses define classmethods ``define_schema`` and ``execute``."""

        FUNCTION = "run_v1"

        @classmethod
        def define_schema(cls) -> Schema:
            raise NotImplementedError

        @classmethod
        def execute(cls, **kwargs) -> NodeOutput:
            raise NotImplementedError

        @classmethod
        def GET_SCHEMA(cls) -> Schema:
            return cls.define_schema()

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            schema = cls.define_schema()
            out: dict = {"required": {}, "optional": {}}
            for inp in schema.inputs:
                out["optional" if inp.optional else "required"][inp.id] = inp.as_v1()
            return out

        RETURN_TYPES = _SchemaProperty(lambda cls, s: tuple(o.io_type for o in s.outputs))
        RETURN_NAMES = _SchemaProperty(lambda cls, s: tuple(o.display_name or o.io_type for o in s.outputs))
        CATEGORY = _SchemaProperty(lambda cls, s: s.category)
        OUTPUT_NODE = _SchemaProperty(lambda cls, s: s.is_output_node)
        DESCRIPTION = _SchemaProperty(lambda cls, s: s.description)

        def run_v1(self, **kwargs):
            out = type(self).execute(**kwargs)
            return out.result or ()

    class ComfyExtension:
        async def get_node_list(self) -> list:
            raise NotImplementedError

    _types = {"Model": "MODEL", "Clip": "CLIP", "Image": "IMAGE", "String": "STRING", "Float": "FLOAT",
              "Int": "INT", "Boolean": "BOOLEAN", "Combo": "COMBO"}
    io = types.SimpleNamespace(Schema=Schema, NodeOutput=NodeOutput, ComfyNode=ComfyNode,
                               **{name: _io_type(name, t) for name, t in _types.items()})
