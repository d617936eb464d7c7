"""Command-line flags shared by every service, each with an environment fallback.

The names, environment variables and default ports are a contract with the Kubernetes
manifests and the supervisor: change them only together.
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


def env(name: str, default=None, cast=str):
    """The value of ``PALM_RLHF_<name>`` cast to ``cast``, else ``default``."""
    raw = os.environ.get(f"PALM_RLHF_{name}")
    if raw is None or raw == "":
        return default
    if cast is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return cast(raw)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags every process understands (the contract in docs/services.md)."""
    p.add_argument("--host", default=env("HOST", "127.0.0.1"), help="address to bind (PALM_RLHF_HOST)")
    p.add_argument("--data-dir", type=Path, default=env("DATA_DIR", "./data", Path),
                   help="state directory; checkpoints under DATA_DIR/checkpoints/<kind> (PALM_RLHF_DATA_DIR)")
    p.add_argument("--checkpoint", default=env("CHECKPOINT"),
                   help="checkpoint folder or store version to serve; default the store's current "
                        "version, else the demo model (PALM_RLHF_CHECKPOINT)")
    p.add_argument("--policy-addr", default=env("POLICY_ADDR", DEFAULT_ADDRS["policy"]),
                   help="policy service address (PALM_RLHF_POLICY_ADDR)")
    p.add_argument("--reference-addr", default=env("REFERENCE_ADDR", DEFAULT_ADDRS["reference"]),
                   help="reference service address (PALM_RLHF_REFERENCE_ADDR)")
    p.add_argument("--reward-addr", default=env("REWARD_ADDR", DEFAULT_ADDRS["reward"]),
                   help="reward service address (PALM_RLHF_REWARD_ADDR)")
    # None means "not given": the policy follows a trainer only when told where it is.
    p.add_argument("--trainer-addr", default=env("TRAINER_ADDR"),
                   help=f"trainer service address (PALM_RLHF_TRAINER_ADDR, default {DEFAULT_ADDRS['trainer']}); "
                        "when given, policy replicas follow its version announcements")
    p.add_argument("--database-url", default=env("DATABASE_URL"),
                   help="feedback database; default sqlite:///DATA_DIR/feedback.db (PALM_RLHF_DATABASE_URL)")
    p.add_argument("--admin-token", default=env("ADMIN_TOKEN"),
                   help="when set, admin RPCs need metadata 'authorization: Bearer TOKEN' (PALM_RLHF_ADMIN_TOKEN)")
    p.add_argument("--device", default=env("DEVICE", "cpu"), choices=("cpu", "cuda", "auto"),
                   help="torch device (PALM_RLHF_DEVICE)")
    p.add_argument("--torch-threads", type=int, default=env("TORCH_THREADS", 1, int),
                   help="CPU threads per model process (PALM_RLHF_TORCH_THREADS; default 1: several model "
                        "processes share the cores, and oversubscribed OpenMP threads spin instead of working)")
    p.add_argument("--tls-cert", default=env("TLS_CERT"),
                   help="PEM certificate chain: serve gRPC over TLS (PALM_RLHF_TLS_CERT)")
    p.add_argument("--tls-key", default=env("TLS_KEY"),
                   help="PEM private key of --tls-cert (PALM_RLHF_TLS_KEY)")
    p.add_argument("--tls-client-ca", default=env("TLS_CLIENT_CA"),
                   help="PEM CA bundle: require client certificates signed by it, i.e. mutual TLS "
                        "(PALM_RLHF_TLS_CLIENT_CA)")
    p.add_argument("--max-message-bytes", type=int, default=env("MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, int),
                   help="largest gRPC message sent or received (PALM_RLHF_MAX_MESSAGE_BYTES)")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``palm-rlhf serve ROLE``; flags a role does not use are ignored by it."""
    p.add_argument("role", choices=ROLES, help="which service to run")
    p.add_argument("--port", type=int, default=env("PORT", None, int),
                   help="port to serve on; 0 = ephemeral, printed at start-up (PALM_RLHF_PORT; defaults "
                        + ", ".join(f"{r} {n}" for r, n in DEFAULT_PORTS.items()) + ")")
    p.add_argument("--metrics-port", type=int, default=env("METRICS_PORT", None, int),
                   help="Prometheus metrics HTTP port; 0 = ephemeral, -1 = off (PALM_RLHF_METRICS_PORT; defaults "
                        + ", ".join(f"{r} {n}" for r, n in DEFAULT_METRICS_PORTS.items()) + ")")
    add_common_arguments(p)
    g = p.add_argument_group("serving limits and lifecycle")
    g.add_argument("--grace", type=float, default=env("GRACE", 10.0, float),
                   help="seconds in-flight requests get to finish after SIGTERM (PALM_RLHF_GRACE)")
    g.add_argument("--drain-delay", type=float, default=env("DRAIN_DELAY", 0.0, float),
                   help="after SIGTERM, keep reporting NOT_SERVING at least this long before closing the "
                        "port, so load balancers notice (PALM_RLHF_DRAIN_DELAY)")
    g.add_argument("--max-prompt-tokens", type=int, default=env("MAX_PROMPT_TOKENS", 1024, int),
                   help="longest prompt accepted, in tokens (PALM_RLHF_MAX_PROMPT_TOKENS)")
    g.add_argument("--max-new-tokens", type=int, default=env("MAX_NEW_TOKENS", 512, int),
                   help="largest max_new_tokens a request may ask for (PALM_RLHF_MAX_NEW_TOKENS)")
    g.add_argument("--default-max-new-tokens", type=int, default=env("DEFAULT_MAX_NEW_TOKENS", 64, int),
                   help="max_new_tokens when a request leaves it unset (PALM_RLHF_DEFAULT_MAX_NEW_TOKENS)")
    g.add_argument("--max-n", type=int, default=env("MAX_N", 16, int),
                   help="most samples per prompt (PALM_RLHF_MAX_N)")
    g.add_argument("--max-batch", type=int, default=env("MAX_BATCH", 64, int),
                   help="most prompts / sequences / responses in one request (PALM_RLHF_MAX_BATCH)")
    g.add_argument("--max-batch-rows", type=int, default=env("MAX_BATCH_ROWS", 128, int),
                   help="policy: most sequences (prompts x samples) decoded together in one batch "
                        "(PALM_RLHF_MAX_BATCH_ROWS)")
    g.add_argument("--batch-window-ms", type=float, default=env("BATCH_WINDOW_MS", 0.0, float),
                   help="policy: how long the batcher waits for more requests before a forward pass "
                        "(PALM_RLHF_BATCH_WINDOW_MS)")
    g.add_argument("--batch-threads", type=int, default=env("BATCH_THREADS", os.cpu_count() or 1, int),
                   help="policy: torch threads for large batches (>= --batch-threads-min-rows rows); small "
                        "batches keep --torch-threads (PALM_RLHF_BATCH_THREADS, default: the CPU count; 0 "
                        "disables)")
    g.add_argument("--quantize", default=env("QUANTIZE", "none"), choices=("none", "int8"),
                   help="policy: int8 = weight-only int8 decode steps on the CPU for batches of up to 4 "
                        "sequences, about twice as fast at one sequence; log-probs then come from the "
                        "quantized model (PALM_RLHF_QUANTIZE)")
    g.add_argument("--batch-threads-min-rows", type=int, default=env("BATCH_THREADS_MIN_ROWS", 16, int),
                   help="policy: rows (prompts x samples) that make a batch large (PALM_RLHF_BATCH_THREADS_MIN_ROWS)")
    g.add_argument("--follow-store", type=float, default=env("FOLLOW_STORE", 0.0, float),
                   help="policy: poll the store's CURRENT pointer every SECONDS and load new versions; "
                        "0 = off (PALM_RLHF_FOLLOW_STORE)")
    g.add_argument("--scorer", default=env("SCORER", "learned"), choices=("learned", "sentiment"),
                   help="reward: default scorer (PALM_RLHF_SCORER)")
    g.add_argument("--update-fn", default=env("UPDATE_FN"),
                   help="trainer: 'module:factory' returning the update callable, factory(args) -> "
                        "update_fn(core) -> (new_version | None, metrics) (PALM_RLHF_UPDATE_FN); "
                        "default: a no-op reporting 'no new feedback'")
    g.add_argument("--update-interval", type=float, default=env("UPDATE_INTERVAL", 0.0, float),
                   help="trainer: run an update round every SECONDS whatever the feedback (replaces the "
                        "automatic rounds below); 0 = off (PALM_RLHF_UPDATE_INTERVAL)")
    g.add_argument("--round-after-feedback", type=int, default=env("ROUND_AFTER_FEEDBACK", 64, int),
                   help="trainer: start a round by itself once this many feedback rows are new; 0 = off "
                        "(PALM_RLHF_ROUND_AFTER_FEEDBACK, default 64)")
    g.add_argument("--round-after-seconds", type=float, default=env("ROUND_AFTER_SECONDS", 90.0, float),
                   help="trainer: or this many seconds after the last round once any feedback row is new; "
                        "0 = off; both 0 = rounds only on Trigger (PALM_RLHF_ROUND_AFTER_SECONDS, default 90)")
    g.add_argument("--round-poll", type=float, default=env("ROUND_POLL", 5.0, float),
                   help="trainer: how often to count new feedback rows for the automatic rounds "
                        "(PALM_RLHF_ROUND_POLL, default 5)")
    g.add_argument("--store-poll", type=float, default=env("STORE_POLL", 2.0, float),
                   help="trainer: how often to look for CURRENT changes made outside the trainer, to "
                        "announce them (PALM_RLHF_STORE_POLL)")
    gw = p.add_argument_group("gateway")
    gw.add_argument("--api-keys-file", default=env("API_KEYS_FILE"),
                    help="gateway: file with one API key per line (PALM_RLHF_API_KEYS_FILE; "
                         "PALM_RLHF_API_KEYS adds comma-separated keys)")
    gw.add_argument("--rate-limit", type=rate_limit_spec,
                    default=rate_limit_spec(env("RATE_LIMIT", DEFAULT_RATE_LIMIT)),
                    help="gateway: request units per API key (a chat completion 1, a feedback row 0.1); a "
                         "bare number is per minute, or give N/s, N/min, N/h, N/s:BURST, 'off' "
                         "(PALM_RLHF_RATE_LIMIT, default 1200/min:300)")
    gw.add_argument("--keep-alive", type=float, default=env("KEEP_ALIVE", 75.0, float),
                    help="gateway: seconds an idle HTTP connection stays open (PALM_RLHF_KEEP_ALIVE, default 75; "
                         "keep it above the idle timeout of clients and load balancers)")
    gw.add_argument("--insecure-no-auth", action="store_true", default=env("INSECURE_NO_AUTH", False, bool),
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


def resolve_ports(args: argparse.Namespace) -> argparse.Namespace:
    """Fill role-dependent defaults (ports, trainer address, database URL) in place."""
    role = args.role
    if args.port is None:
        args.port = DEFAULT_PORTS[role]
    if getattr(args, "metrics_port", None) is None:
        args.metrics_port = DEFAULT_METRICS_PORTS.get(role, -1)
    args.follow_trainer = args.trainer_addr is not None
    if args.trainer_addr is None:
        args.trainer_addr = DEFAULT_ADDRS["trainer"]
    if args.database_url is None:
        args.database_url = f"sqlite:///{Path(args.data_dir).resolve() / 'feedback.db'}"
    return args


def torch_device(spec: str) -> str:
    """'auto' picks CUDA when present."""
    if spec == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec
