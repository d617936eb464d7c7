"""``palm-rlhf serve ROLE`` and ``palm-rlhf up``: the service commands."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import time

from services.common.config import add_serve_arguments

# role -> module whose run(args) serves it; imported only when that role is started
RUNNERS = {
    "policy": "services.policy.server",
    "reference": "services.reference.server",
    "reward": "services.reward.server",
    "trainer": "services.trainer.server",
}


def check_admin_exposure(settings) -> None:
    """Refuse to serve beyond loopback without an admin token (the admin RPCs would be closed
    anyway, but an operator who binds to the network has forgotten to set one)."""
    if settings.role != "gateway" and not settings.loopback and not settings.admin_token:
        raise SystemExit(
            f"refusing to serve {settings.role} on {settings.host} without an admin token: set "
            "PALM_RLHF_ADMIN_TOKEN or PALM_RLHF_ADMIN_TOKEN_FILE (or --admin-token-file), or bind to 127.0.0.1"
        )


def stop_with_parent(parent_pid: int, poll_s: float = 1.0) -> threading.Thread:
    """Watch the parent (``palm-rlhf up``): once it is gone, even killed with SIGKILL, send this
    process SIGTERM, so that it stops as gracefully as when its parent stops it."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        with contextlib.suppress(OSError):  # the parent held our output: it may be gone too
            print(f"parent process {parent_pid} is gone: stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=watch, name="parent-watch", daemon=True)
    t.start()
    return t


def _serve(args: argparse.Namespace) -> int:
    from services.common.settings import serve_settings

    settings = serve_settings(args)
    check_admin_exposure(settings)
    if settings.parent_pid:
        stop_with_parent(settings.parent_pid)
    if settings.role == "gateway":
        from services.gateway.app import run_gateway

        return int(run_gateway(settings) or 0)
    import torch

    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    if settings.role == "trainer" and not settings.update_fn:
        settings.update_fn = "services.trainer.loop:make_update_fn"  # the online RLHF loop (docs/online.md)
    module = importlib.import_module(RUNNERS[settings.role])
    return int(module.run(settings) or 0)


def _up(args: argparse.Namespace) -> int:
    from services.common.settings import UpSettings, build_settings
    from services.supervisor import run_supervisor

    return run_supervisor(build_settings(UpSettings, args))


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="run one service (policy, reference, reward, trainer or gateway)",
        description="Run one service process. Every flag --some-name has the environment variable "
                    "PALM_RLHF_SOME_NAME; a flag wins over the variable.",
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
