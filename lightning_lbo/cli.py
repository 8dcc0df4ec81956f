"""The ``lbo`` command.

``lbo data`` tells where Fashion-MNIST was found; ``lbo compare`` trains recipes side by side on
real data and prints a table (see :mod:`lightning_lbo.compare`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbo", description="lightning_lbo: large-batch optimization for Lightning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    data = sub.add_parser("data", help="locate the Fashion-MNIST files and print their sizes")
    data.add_argument("--data-dir", default=None, help="directory to look in first (idx files)")
    data.add_argument("--download", action="store_true", help="download through torchvision if not found")
    data.set_defaults(func=_cmd_data)
    from lightning_lbo.compare import add_compare_parser

    add_compare_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
