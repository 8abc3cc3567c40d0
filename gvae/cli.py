"""`gvae` command line: each subcommand lives in its own module under gvae/commands/.

User errors (GvaeError) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from gvae.commands import report, reproduce, study, train
from gvae.errors import GvaeError

COMMANDS = [train, study, report, reproduce]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvae", description="Train and study GAN, WGAN, VAE, VAE-GAN and constrained VAE-GAN."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except GvaeError as error:
        print(f"gvae: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "gvae: interrupted; finished results and the last checkpoint are kept", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
