"""The `moorage` command."""

from __future__ import annotations

import argparse
import os
import sys

from moorage import __version__
from moorage.cli import access, audit, backup, cluster, gc, lb, repair, serve, webhook
from moorage.cli.errors import SENTENCES


class Parser(argparse.ArgumentParser):
    """Options before or after positionals, in every command.

    argparse's plain parse stops matching positionals at the first option, so
    `config set --existing URL readonly true` left `readonly true` over. A
    command without subcommands is parsed the intermixed way (options first,
    then positionals); subparsers inherit the class.
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls back into parse_known_args
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moorage", description="Moorage: a private OCI container registry that scales with replicas.")
    parser.add_argument("--version", action="version", version=f"moorage {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="how much to log (default: info)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve.register(commands)
    cluster.register(commands)
    repair.register(commands)
    lb.register(commands)
    access.register(commands)
    audit.register(commands)
    gc.register(commands)
    backup.register(commands)
    webhook.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # gRPC warns on every fork (starting etcd) unless told we don't fork with it.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except SENTENCES as e:
        print(f"moorage: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
