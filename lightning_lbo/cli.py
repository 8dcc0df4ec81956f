"""The ``lbo`` command.

``lbo data`` tells where Fashion-MNIST was found; ``lbo compare`` trains recipes side by side on
real data and prints a table (see :mod:`lightning_lbo.compare`).

Subcommands are registered lazily, so that ``lbo --help`` imports neither torch nor Lightning: the
module of a subcommand is imported only when that subcommand is run (or its own ``--help`` asked).
To add one, write ``add_<name>_parser(subparsers)`` in its module (it calls
``subparsers.add_parser(name, ...)`` and ``set_defaults(func=run)``, where ``run(args) -> int``
is the exit code) and add a row to :data:`COMMANDS`: ``name -> (module, function, one-line help)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Subcommand -> (module, function that adds its sub-parser, help line shown by ``lbo --help``).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("lightning_lbo.cli", "add_data_parser", "locate the Fashion-MNIST files and print their sizes"),
    "compare": ("lightning_lbo.compare", "add_compare_parser",
                "train recipes side by side on Fashion-MNIST and print a table"),
    "advise": ("lightning_lbo.advise_cli", "add_advise_parser",
               "estimate the critical batch, recommend a batch and LR"),
}


def _cmd_data(args: argparse.Namespace) -> int:
    from lightning_lbo.data import DataNotFoundError, load_split, locate_fashion_mnist

    try:
        files = locate_fashion_mnist(args.data_dir, download=args.download)
    except DataNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"Fashion-MNIST: {files.directory} ({files.source})")
    for split in ("train", "test"):
        images, labels = load_split(files, split)
        print(f"  {split:5s}: {images.shape[0]:6d} images {tuple(images.shape[1:])} uint8, "
              f"{int(labels.max()) + 1} classes")
    return 0


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help=COMMANDS["data"][2], description="Locate Fashion-MNIST and print its sizes.")
    data.add_argument("--data-dir", default=None, help="directory to look in first (idx files)")
    data.add_argument("--download", action="store_true", help="download through torchvision if not found")
    data.set_defaults(func=_cmd_data)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``lbo`` parser with the full sub-parser of ``command`` only (``None``: of every command).

    The other commands get a placeholder that only lists them, so their modules are not imported.
    """
    parser = argparse.ArgumentParser(prog="lbo", description="lightning_lbo: large-batch optimization for Lightning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, function, help_line) in COMMANDS.items():
        if command is None or name == command:
            getattr(importlib.import_module(module), function)(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The first positional word names the command (lbo has no option that takes a value).
    command = next((word for word in argv if not word.startswith("-")), "")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
