"""``python -m app [--port N] [--host H] ...``: the same as ``riemann-diffusion demo``."""

import sys

from riemann_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
