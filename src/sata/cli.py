"""The ``sata`` console script. Each subcommand lives in its own module, imported on use.

A command module provides ``add_arguments(parser)`` and ``main(args) -> int`` and keeps
heavy imports (matplotlib, transformers) inside ``main`` so ``sata --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (name, module, one-line help): add a line here to add a command
COMMANDS: list[tuple[str, str, str]] = [
    ("replicate", "sata.replicate.cli", "reproduce the paper's evaluation: figures, report.md, results.json"),
    ("bench", "sata.bench.cli", "speed and memory against SDPA with a KV cache and the paper's formulation"),
    ("train", "sata.train.cli", "train a byte-level language model with SATA or softmax attention"),
    ("generate", "sata.train.generate", "stream text from a trained checkpoint at constant memory per token"),
    ("evaluate", "sata.train.evaluate", "bits per byte of trained models at any context, and by position"),
    ("convert", "sata.integrations.convert_cli", "adapt a pretrained transformers model to SATA attention; perplexity"),
]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help only where it tells something: not when the help
    already states its default, nor for flags (False), unset options (None) or empty lists."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is x for x in (None, False, argparse.SUPPRESS)) or action.default == []:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sata",
        description="Symmetry-aware Taylor attention: softmax attention at constant cost per token.",
    )
    parser.add_argument("--version", action="version", version=f"sata {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0],
                           formatter_class=_HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._module.main(args) or 0)
    except SystemExit as e:
        if isinstance(e.code, str):  # a subcommand's refusal with its message: the status of a usage error
            print(e.code, file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
