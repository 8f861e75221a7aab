"""``riemann-diffusion train``: every key of the TrainConfig tree as a flag, plus ``--config FILE``.

With no arguments it runs the offline default (tiny pipeline, bundled example
images, outputs in ``outputs/default``).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import time

from .config import (ALIASES, ConfigError, TrainConfig, apply_overrides, config_keys, config_to_dict, field_help,
                     load_config)

__all__ = ["add_arguments", "run", "config_from_args"]

_DEST = "cfg:"


def _nargs(tp) -> dict:
    import typing

    args = typing.get_args(tp) if typing.get_origin(tp) is not list else (tp,)
    args = args or (tp,)
    if tp is bool:
        return dict(nargs="?", const="true", metavar="BOOL")
    if any(typing.get_origin(a) is list for a in args):
        return dict(nargs="+", metavar="VALUE")
    return dict(metavar=getattr(tp, "__name__", "VALUE").upper() if isinstance(tp, type) else "VALUE")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--config``, ``--print-config`` and one flag per config key (short and dotted forms)."""
    parser.allow_abbrev = False
    parser.add_argument("--config", metavar="FILE", help="YAML/TOML config file; flags override its values")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    reverse = {}
    for alias, leaf in ALIASES.items():
        reverse.setdefault(leaf, []).append(alias)
    defaults = config_to_dict(TrainConfig())
    helps = field_help()
    for section, fields in defaults.items():
        group = parser.add_argument_group(section)
        for leaf, default in fields.items():
            tp = config_keys()[f"{section}.{leaf}"][2]
            flags = [_flag(leaf), _flag(f"{section}.{leaf}")] + [_flag(a) for a in reverse.get(leaf, [])]
            group.add_argument(*flags, dest=f"{_DEST}{section}.{leaf}", default=argparse.SUPPRESS,
                               help=f"{helps.get(f'{section}.{leaf}', '')} (default: {default!r})".replace("%", "%%"),
                               **_nargs(tp))
    known = [f for action in parser._actions for f in action.option_strings]
    parser.error = _suggesting_error(parser.error, known)


def _suggesting_error(original, known: list[str]):
    def error(message: str):
        if message.startswith("unrecognized arguments:"):
            hints = []
            for token in message.split(":", 1)[1].split():
                if token.startswith("--"):
                    close = difflib.get_close_matches(token.split("=")[0], known, n=2, cutoff=0.6)
                    if close:
                        hints.append(f"{token}: did you mean {' or '.join(close)}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        original(message)

    return error


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file of ``--config`` (or the defaults) with the flags applied, validated."""
    cfg = load_config(args.config) if getattr(args, "config", None) else TrainConfig()
    overrides = {k[len(_DEST):]: v for k, v in vars(args).items() if k.startswith(_DEST)}
    return apply_overrides(cfg, overrides).validate()


def run(args: argparse.Namespace) -> int:
    from .data import DataError
    from .loop import NonFiniteLossError, train

    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    t0 = time.perf_counter()
    try:
        result = train(cfg)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    _report(result, time.perf_counter() - t0)
    return 0


def _report(result, seconds: float) -> None:
    lines = [f"{'cancelled' if result.cancelled else 'finished'} {result.steps} steps in {seconds:.1f} s "
             f"(final loss {result.final_loss:.4f})" if result.final_loss is not None else f"finished in {seconds:.1f} s"]
    for fmt, path in result.adapter_paths.items():
        lines.append(f"  adapter ({fmt}):    {path}")
    if result.export_error:
        lines.append(f"  export skipped:    {result.export_error}")
    for label, path in (("adapter state", result.adapter_state_path), ("validation grid", result.grid_path),
                        ("validation images", result.validation_dir), ("loss plot", result.loss_plot_path),
                        ("log", result.log_path), ("last checkpoint", result.checkpoint_path)):
        if path:
            lines.append(f"  {label + ':':<18} {path}")
    print("\n".join(lines))
