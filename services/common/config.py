"""Command-line flags shared by every service, and the defaults they share.

Each flag ``--some-name`` has the environment variable ``PALM_RLHF_SOME_NAME``; the parsers here
only record which flags were given, and services/common/settings.py builds the process's one
settings object from them over the environment over the defaults. The names, environment
variables and default ports are a contract with the Kubernetes manifests and the supervisor:
change them only together.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# requests units a minute per client and the burst: the gateway charges a chat completion 1 unit
# and a feedback row or a read 0.1 (services/gateway/auth.py)
DEFAULT_RATE_LIMIT = "1200/min:300"

ROLES = ("policy", "reference", "reward", "trainer", "gateway")

DEFAULT_PORTS = {"policy": 50051, "reference": 50052, "reward": 50053, "trainer": 50054, "gateway": 8000}
DEFAULT_METRICS_PORTS = {"policy": 9101, "reference": 9102, "reward": 9103, "trainer": 9104}
DEFAULT_ADDRS = {role: f"127.0.0.1:{port}" for role, port in DEFAULT_PORTS.items() if role != "gateway"}

# 64 MiB: a batch of 32 prompts x 16 samples x 512 tokens with log-probs is ~2 MiB, so this
# leaves room while still refusing absurd payloads before they are parsed.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# `palm-rlhf up` writes the admin token it uses here (mode 0600); the CLI clients look for it
ADMIN_TOKEN_FILE_NAME = "admin-token"
# `palm-rlhf up` writes the addresses it chose here (DATA_DIR/addresses.json) and removes the file
# when it stops; the CLI clients take an address from it when none was given (services/supervisor.py)
ADDRESSES_FILE_NAME = "addresses.json"

_GIVEN = "_given_flags"


def _mark_given(namespace: argparse.Namespace, dest: str) -> None:
    given = getattr(namespace, _GIVEN, None)
    if given is None:
        given = set()
        setattr(namespace, _GIVEN, given)
    given.add(dest)


class _Store(argparse.Action):
    """``store`` that also records that the flag was given on the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _mark_given(namespace, self.dest)


class _StoreTrue(argparse.Action):
    """``store_true`` that also records that the flag was given."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs=0, const=True, default=default, required=required, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        _mark_given(namespace, self.dest)


def flag(p, *names: str, **kw) -> argparse.Action:
    """``p.add_argument`` whose value counts as given only when it is on the command line, so
    the settings (services/common/settings.py) let the environment fill the rest; the parser's
    own default is the setting's default."""
    if kw.get("action") == "store_true":
        kw["action"] = _StoreTrue
    else:
        kw.setdefault("action", _Store)
    return p.add_argument(*names, **kw)


def given_flags(args: argparse.Namespace) -> dict[str, object]:
    """dest -> value of the flags given on the command line (positionals always count)."""
    out = {dest: getattr(args, dest) for dest in getattr(args, _GIVEN, ())}
    if getattr(args, "role", None) is not None:
        out["role"] = args.role
    return out


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags every process understands (the contract in docs/services.md)."""
    flag(p, "--host", default="127.0.0.1", help="address to bind (PALM_RLHF_HOST)")
    flag(p, "--data-dir", type=Path, default="./data",
            help="state directory; checkpoints under DATA_DIR/checkpoints/<kind> (PALM_RLHF_DATA_DIR)")
    flag(p, "--checkpoint", default=None,
            help="checkpoint folder or store version to serve; default the store's current "
                 "version, else the demo model (PALM_RLHF_CHECKPOINT)")
    flag(p, "--policy-addr", default=DEFAULT_ADDRS["policy"],
            help="policy service address (PALM_RLHF_POLICY_ADDR)")
    flag(p, "--reference-addr", default=DEFAULT_ADDRS["reference"],
            help="reference service address (PALM_RLHF_REFERENCE_ADDR)")
    flag(p, "--reward-addr", default=DEFAULT_ADDRS["reward"],
            help="reward service address (PALM_RLHF_REWARD_ADDR)")
    # None means "not given": the policy follows a trainer only when told where it is.
    flag(p, "--trainer-addr", default=None,
            help=f"trainer service address (PALM_RLHF_TRAINER_ADDR, default {DEFAULT_ADDRS['trainer']}); "
                 "when given, policy replicas follow its version announcements")
    flag(p, "--database-url", default=None,
            help="feedback database; default sqlite:///DATA_DIR/feedback.db (PALM_RLHF_DATABASE_URL, "
                 "preferred for URLs with a password: flags are visible in the process list)")
    flag(p, "--admin-token", default=None,
         help="admin RPCs (LoadVersion, Trigger, Rollback) need metadata 'authorization: Bearer TOKEN'; "
              "without a token they are refused. Prefer PALM_RLHF_ADMIN_TOKEN or --admin-token-file: "
              "a flag's value is visible to every local user in the process list")
    flag(p, "--admin-token-file", type=Path, default=None,
         help="read the admin token from this file's first line (PALM_RLHF_ADMIN_TOKEN_FILE)")
    flag(p, "--device", default="cpu", choices=("cpu", "cuda", "auto"),
            help="torch device (PALM_RLHF_DEVICE)")
    flag(p, "--torch-threads", type=int, default=1,
            help="CPU threads per model process (PALM_RLHF_TORCH_THREADS; default 1: several model "
                 "processes share the cores, and oversubscribed OpenMP threads spin instead of working)")
    flag(p, "--tls-cert", default=None,
            help="PEM certificate chain: serve gRPC over TLS (PALM_RLHF_TLS_CERT)")
    flag(p, "--tls-key", default=None,
            help="PEM private key of --tls-cert (PALM_RLHF_TLS_KEY)")
    flag(p, "--tls-client-ca", default=None,
            help="PEM CA bundle: require client certificates signed by it, i.e. mutual TLS "
                 "(PALM_RLHF_TLS_CLIENT_CA)")
    flag(p, "--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
            help="largest gRPC message sent or received (PALM_RLHF_MAX_MESSAGE_BYTES)")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``palm-rlhf serve ROLE``; flags a role does not use are ignored by it."""
    flag(p, "role", choices=ROLES, help="which service to run")
    flag(p, "--port", type=int, default=None,
            help="port to serve on; 0 = ephemeral, printed at start-up (PALM_RLHF_PORT; defaults "
                 + ", ".join(f"{r} {n}" for r, n in DEFAULT_PORTS.items()) + ")")
    flag(p, "--metrics-port", type=int, default=None,
            help="Prometheus metrics HTTP port; 0 = ephemeral, -1 = off (PALM_RLHF_METRICS_PORT; defaults "
                 + ", ".join(f"{r} {n}" for r, n in DEFAULT_METRICS_PORTS.items()) + ")")
    add_common_arguments(p)
    g = p.add_argument_group("serving limits and lifecycle")
    flag(g, "--grace", type=float, default=10.0,
            help="seconds in-flight requests get to finish after SIGTERM (PALM_RLHF_GRACE)")
    flag(g, "--drain-delay", type=float, default=0.0,
            help="after SIGTERM, keep reporting NOT_SERVING at least this long before closing the "
                 "port, so load balancers notice (PALM_RLHF_DRAIN_DELAY)")
    flag(g, "--max-prompt-tokens", type=int, default=1024,
            help="longest prompt accepted, in tokens (PALM_RLHF_MAX_PROMPT_TOKENS)")
    flag(g, "--max-new-tokens", type=int, default=512,
            help="largest max_new_tokens a request may ask for (PALM_RLHF_MAX_NEW_TOKENS)")
    flag(g, "--default-max-new-tokens", type=int, default=64,
            help="max_new_tokens when a request leaves it unset (PALM_RLHF_DEFAULT_MAX_NEW_TOKENS)")
    flag(g, "--max-n", type=int, default=16,
            help="most samples per prompt (PALM_RLHF_MAX_N)")
    flag(g, "--max-batch", type=int, default=64,
            help="most prompts / sequences / responses in one request (PALM_RLHF_MAX_BATCH)")
    flag(g, "--max-batch-rows", type=int, default=128,
            help="policy: most sequences (prompts x samples) decoded together in one batch "
                 "(PALM_RLHF_MAX_BATCH_ROWS)")
    flag(g, "--max-queue-rows", type=int, default=512,
            help="policy: prompts x samples that may wait for the running batch; more are refused at once "
                 "as overloaded, the gateway answers 503 + Retry-After (PALM_RLHF_MAX_QUEUE_ROWS, default 512, "
                 "0 = no cap)")
    flag(g, "--batch-window-ms", type=float, default=0.0,
            help="policy: how long the batcher waits for more requests before a forward pass "
                 "(PALM_RLHF_BATCH_WINDOW_MS)")
    flag(g, "--batch-threads", type=int, default=os.cpu_count() or 1,
            help="policy: torch threads for large batches (>= --batch-threads-min-rows rows); small "
                 "batches keep --torch-threads (PALM_RLHF_BATCH_THREADS, default: the CPU count; 0 "
                 "disables)")
    flag(g, "--quantize", default="none", choices=("none", "int8"),
            help="policy: int8 = weight-only int8 decode steps on the CPU for batches of up to 4 "
                 "sequences, about twice as fast at one sequence; log-probs then come from the "
                 "quantized model (PALM_RLHF_QUANTIZE)")
    flag(g, "--batch-threads-min-rows", type=int, default=16,
            help="policy: rows (prompts x samples) that make a batch large (PALM_RLHF_BATCH_THREADS_MIN_ROWS)")
    flag(g, "--follow-store", type=float, default=0.0,
            help="policy: poll the store's CURRENT pointer every SECONDS and load new versions; "
                 "0 = off (PALM_RLHF_FOLLOW_STORE)")
    flag(g, "--scorer", default="learned", choices=("learned", "sentiment"),
            help="reward: default scorer (PALM_RLHF_SCORER)")
    flag(g, "--update-fn", default=None,
            help="trainer: 'module:factory' returning the update callable, factory(args) -> "
                 "update_fn(core) -> (new_version | None, metrics) (PALM_RLHF_UPDATE_FN); "
                 "default: a no-op reporting 'no new feedback'")
    flag(g, "--update-interval", type=float, default=0.0,
            help="trainer: run an update round every SECONDS whatever the feedback (replaces the "
                 "automatic rounds below); 0 = off (PALM_RLHF_UPDATE_INTERVAL)")
    flag(g, "--round-after-feedback", type=int, default=64,
            help="trainer: start a round by itself once this many feedback rows are new; 0 = off "
                 "(PALM_RLHF_ROUND_AFTER_FEEDBACK, default 64)")
    flag(g, "--round-after-seconds", type=float, default=90.0,
            help="trainer: or this many seconds after the last round once any feedback row is new; "
                 "0 = off; both 0 = rounds only on Trigger (PALM_RLHF_ROUND_AFTER_SECONDS, default 90)")
    flag(g, "--round-poll", type=float, default=5.0,
            help="trainer: how often to count new feedback rows for the automatic rounds "
                 "(PALM_RLHF_ROUND_POLL, default 5)")
    flag(g, "--store-poll", type=float, default=2.0,
            help="trainer: how often to look for CURRENT changes made outside the trainer, to "
                 "announce them (PALM_RLHF_STORE_POLL)")
    gw = p.add_argument_group("gateway")
    flag(gw, "--api-keys-file", default=None,
             help="gateway: file with one API key per line (PALM_RLHF_API_KEYS_FILE; "
                  "PALM_RLHF_API_KEYS adds comma-separated keys)")
    flag(gw, "--rate-limit", type=rate_limit_spec,
             default=DEFAULT_RATE_LIMIT,
             help="gateway: request units per API key (a chat completion 1, a feedback row 0.1); a "
                  "bare number is per minute, or give N/s, N/min, N/h, N/s:BURST, 'off' "
                  "(PALM_RLHF_RATE_LIMIT, default 1200/min:300)")
    flag(gw, "--keep-alive", type=float, default=75.0,
             help="gateway: seconds an idle HTTP connection stays open (PALM_RLHF_KEEP_ALIVE, default 75; "
                  "keep it above the idle timeout of clients and load balancers)")
    flag(gw, "--max-inflight", type=int, default=32,
             help="gateway: chat completions in flight at once; more are refused with 503 + Retry-After "
                  "(PALM_RLHF_MAX_INFLIGHT, default 32, 0 = no cap)")
    flag(gw, "--body-timeout", type=float, default=30.0,
             help="gateway: seconds a request body may take to arrive; slower clients get 408 "
                  "(PALM_RLHF_BODY_TIMEOUT, default 30, 0 = none)")
    flag(gw, "--header-timeout", type=float, default=10.0,
             help="gateway: seconds a request's headers may take from its first byte; slower connections "
                  "are closed (PALM_RLHF_HEADER_TIMEOUT, default 10, 0 = none)")
    flag(gw, "--max-connections", type=int, default=1024,
             help="gateway: open HTTP connections and requests at once; beyond it 503 "
                  "(PALM_RLHF_MAX_CONNECTIONS, default 1024, 0 = no cap)")
    flag(gw, "--allowed-hosts", default="",
             help="gateway: comma-separated Host header values to serve, '*.example.com' allowed "
                  "(PALM_RLHF_ALLOWED_HOSTS, default: any host)")
    flag(gw, "--max-body-bytes", type=int, default=1 << 20,
             help="gateway: the largest request body (PALM_RLHF_MAX_BODY_BYTES, default 1 MiB)")
    flag(gw, "--min-answer-tokens", type=int, default=32,
             help="gateway: the least room for an answer a long conversation is shortened to leave "
                  "(PALM_RLHF_MIN_ANSWER_TOKENS, default 32)")
    flag(gw, "--insecure-no-auth", action="store_true", default=False,
             help="gateway: serve without API keys on a non-loopback address (PALM_RLHF_INSECURE_NO_AUTH)")


def rate_limit_spec(value: str | float) -> str:
    """Normalise ``--rate-limit``: the contract's unit is requests per minute, so a bare number
    gets an explicit ``/min``; specs with a unit ("10/s", "off") pass through."""
    text = str(value).strip()
    try:
        float(text)
    except ValueError:
        return text
    return "off" if float(text) <= 0 else f"{text}/min"


def torch_device(spec: str) -> str:
    """'auto' picks CUDA when present."""
    if spec == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec
