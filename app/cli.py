"""``riemann-diffusion demo``: serve the Gradio demo (127.0.0.1 unless ``--host`` says otherwise)."""

from __future__ import annotations

import argparse
import os

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the demo to your network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--model", default="tiny",
                        help="preselected base model: 'tiny' (offline), a local diffusers folder or a hub id")
    parser.add_argument("--adapters-dir", default="adapters",
                        help="folder of .safetensors adapters to offer; trained adapters land here (default ./adapters)")
    parser.add_argument("--work-dir", default=None, help="scratch folder for uploads and runs (default: a temp dir)")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise SystemExit(f"--port must be between 1 and 65535; got {args.port}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .layout import build_demo, launch
    from .pipeline import DemoBackend

    backend = DemoBackend(args.adapters_dir, args.work_dir, model=args.model)
    demo = build_demo(backend)
    print(f"riemann-diffusion demo on http://{args.host}:{args.port}  (adapters: {backend.adapters_dir}; Ctrl+C stops)",
          flush=True)
    launch(demo, args.host, args.port, show_error=True)
    return 0
