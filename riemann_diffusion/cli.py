"""``riemann-diffusion`` command line: one sub-command per module.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, importing the chosen one lazily so
``riemann-diffusion --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: sub-command -> (module, one-line help)
COMMANDS = {
    "train": ("riemann_diffusion.training.cli", "train an adapter on a few subject images"),
    "export": ("riemann_diffusion.export_cli", "export a checkpoint to a LoRA file (kohya/peft/diffusers)"),
    "inspect": ("riemann_diffusion.inspect_cli", "show format, keys, ranks and provenance of a LoRA file"),
    "demo": ("app.cli", "launch the Gradio demo (127.0.0.1 by default)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="riemann-diffusion", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    at = next((i for i, a in enumerate(argv) if a in COMMANDS), len(argv))
    top = parser.parse_args(argv[: at + 1])
    if top.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.DEBUG if top.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[top.command][0])
    sub = argparse.ArgumentParser(prog=f"riemann-diffusion {top.command}", description=COMMANDS[top.command][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[at + 1 :])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
