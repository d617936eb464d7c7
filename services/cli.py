"""``palm-rlhf serve ROLE`` and ``palm-rlhf up``: the service commands."""

from __future__ import annotations

import argparse
import importlib

from services.common.config import add_serve_arguments, resolve_ports

# role -> module whose run(args) serves it; imported only when that role is started
RUNNERS = {
    "policy": "services.policy.server",
    "reference": "services.reference.server",
    "reward": "services.reward.server",
    "trainer": "services.trainer.server",
}


def _serve(args: argparse.Namespace) -> int:
    resolve_ports(args)
    if args.role == "gateway":
        from services.gateway.app import run_gateway

        return int(run_gateway(args) or 0)
    import torch

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    if args.role == "trainer" and not args.update_fn:
        args.update_fn = "services.trainer.loop:make_update_fn"  # the online RLHF loop (docs/online.md)
    module = importlib.import_module(RUNNERS[args.role])
    return int(module.run(args) or 0)


def _up(args: argparse.Namespace) -> int:
    from services.supervisor import run_supervisor

    return run_supervisor(args)


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="run one service (policy, reference, reward, trainer or gateway)",
        description="Run one service process. Every flag has a PALM_RLHF_* environment fallback.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    up = subparsers.add_parser(
        "up", help="start every service and the gateway, wait until ready, stop all on Ctrl-C",
        description="Start policy, reference, reward, trainer and the gateway as child processes.",
    )
    from services.supervisor import add_up_arguments

    add_up_arguments(up)
    up.set_defaults(func=_up)
