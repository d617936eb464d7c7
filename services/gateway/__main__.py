"""``python -m services.gateway``: run the gateway on its own (the same as
``palm-rlhf serve gateway``), with every flag falling back to its PALM_RLHF_* variable
(:class:`services.gateway.settings.GatewaySettings`)."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None, help="0 picks a free port (printed)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--policy-addr", default=None)
    p.add_argument("--reward-addr", default=None)
    p.add_argument("--reference-addr", default=None)
    p.add_argument("--trainer-addr", default=None)
    p.add_argument("--database-url", default=None)
    p.add_argument("--api-keys-file", default=None)
    p.add_argument(
        "--rate-limit",
        default=None,
        help="per client, in request units (a chat completion 1, a feedback row 0.1); a bare number is per "
        "minute, or 10/s, 3600/h, 10/s:40 (burst 40), off (default 1200/min:300)",
    )
    p.add_argument("--admin-token", default=None, help="bearer token for the log export (PALM_RLHF_ADMIN_TOKEN)")
    p.add_argument(
        "--admin-token-file", default=None, help="file holding the admin token (PALM_RLHF_ADMIN_TOKEN_FILE)"
    )
    p.add_argument("--max-body-bytes", type=int, default=None)
    p.add_argument("--body-timeout", type=float, default=None,
                   help="seconds a request body may take to arrive; slower clients get 408 (default 30)")
    p.add_argument("--header-timeout", type=float, default=None,
                   help="seconds a request's headers may take from its first byte; slower connections "
                        "are closed (default 10)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open HTTP connections and requests at once; beyond it 503 (default 1024, 0: no cap)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header values to serve ('*.example.com' allowed; default any)")
    p.add_argument("--max-inflight", type=int, default=None,
                   help="chat completions in flight at once; more get 503 + Retry-After (default 32, 0: no cap)")
    p.add_argument("--keep-alive", type=float, default=None, help="idle HTTP connection timeout in seconds (default 75)")
    p.add_argument(
        "--insecure-no-auth", action="store_true", help="allow serving beyond loopback without keys"
    )
    p.add_argument(
        "--min-answer-tokens",
        type=int,
        default=None,
        help="room for an answer a long conversation is shortened to leave (PALM_RLHF_MIN_ANSWER_TOKENS, default 32)",
    )
    p.add_argument("--log-level", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level or "info").upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    from .app import run_gateway

    return run_gateway(args)


if __name__ == "__main__":
    sys.exit(main())
