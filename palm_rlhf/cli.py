"""The ``palm-rlhf`` command.

Subcommands live next to the code they drive; each provider module defines
``register(subparsers)`` and sets ``func`` on its parsers. Providers import their heavy
dependencies inside the handlers so that ``palm-rlhf --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

PROVIDERS = (
    "palm_rlhf.demo.cli",  # chat, demo-build
    "palm_rlhf.rl.cli",  # pretrain, sft, train-reward, ppo
    "services.cli",  # serve, up
    "services.gateway.cli",  # feedback export
    "clients.cli",  # score, chat-client
    "services.trainer.cli",  # trainer status|trigger|rollback, demo-loop
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="palm-rlhf",
        description="PaLM models served as gRPC microservices, with best-of-n chat and online RLHF.",
    )
    parser.add_argument("--log-level", default=None,
                        help="logging level (PALM_RLHF_LOG_LEVEL; default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in PROVIDERS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # provider not installed in this build
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level is None:
        try:
            from services.common.settings import LogSettings
        except ModuleNotFoundError:  # the services are not part of this build
            args.log_level = "INFO"
        else:
            args.log_level = LogSettings.load().log_level
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
