"""API keys and per-client rate limits.

Keys are kept only as SHA-256 digests: a memory dump or a log line never shows a usable key.
A client is identified by a short prefix of its key's digest (``key:ab12cd34``), or by its IP
address (``ip:10.0.0.7``) when the gateway runs without keys on loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from services.common.config import DEFAULT_RATE_LIMIT  # noqa: F401 -- re-exported for the gateway


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_api_keys(path: str | Path | None = None, env_value: str = "") -> list[str]:
    """Keys from a file (one per line; blank lines and ``#`` comments skipped) and from a
    comma-separated string (the setting ``PALM_RLHF_API_KEYS``). Returns the keys themselves;
    hash them with :class:`KeyRing` and drop the list."""
    keys: list[str] = []
    if path:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    keys.extend(k.strip() for k in env_value.split(",") if k.strip())
    return keys


class KeyRing:
    """The set of accepted API keys, stored hashed."""

    def __init__(self, keys: list[str] | None = None):
        self._digests = {hash_key(k) for k in (keys or [])}

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, key: str) -> str | None:
        """The client id for a valid key, None otherwise (constant-time digest comparison)."""
        digest = hash_key(key)
        found = None
        for d in self._digests:
            if hmac.compare_digest(d, digest):
                found = d
        return f"key:{found[:12]}" if found else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# The gateway's default ``--rate-limit`` (per API key; per client address without keys): 1200
# request units a minute (20/s) with a bucket of 300 (15 s worth). Requests are charged by cost
# (:func:`request_cost`): a chat completion takes 1 unit, a feedback row or a read takes 0.1.
# A sequential client never reaches it: through the gateway on the demo model (2 CPU cores) a
# chat completion takes 0.1-0.7 s for real answers and 26-80 ms at the very least (max_tokens=1),
# a feedback POST 2-5 ms; chatting and rating every answer five times (1.5 units a chat) peaked
# at 12 chats/s, 18 units/s, under the 20/s refill (docs/gateway.md). A flood still gets 429 with
# Retry-After: of 1000 chat requests in one second about 320 pass, and a tight loop of 1000
# feedback posts a second (100 units/s) is refused after about 4 s.
# DEFAULT_RATE_LIMIT lives in services/common/config.py, where every entry point reads it.
GENERATION_COST = 1.0  # a chat completion (runs the policy and the reward model), the log export
LIGHT_COST = 0.1  # a feedback row, a read of a completion, its feedback or the model list
_GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/feedback/export"})


def request_cost(method: str, path: str) -> float:
    """Units of the client's rate-limit bucket one request takes: generation (and the export of
    the whole log) costs :data:`GENERATION_COST`; everything else — a feedback POST (one chat
    may get several: thumbs on each candidate plus a preference), reading a completion or its
    feedback, the model list — costs :data:`LIGHT_COST`."""
    path = path.rstrip("/")  # a mount prefix (root_path) may come before the route's path
    return GENERATION_COST if any(path.endswith(p) for p in _GENERATION_PATHS) else LIGHT_COST


@dataclass
class RateLimit:
    rate: float  # tokens per second
    burst: float  # bucket size

    @classmethod
    def parse(cls, spec: str | float | None) -> RateLimit | None:
        """Request units per client (a chat completion is 1, a feedback row 0.1, see
        :func:`request_cost`): ``"120"`` or ``"120/min"`` (a bare number is per minute, as the
        ``--rate-limit`` flag documents), ``"10/s"``, ``"3600/h"``, with an optional burst after
        a colon (``"10/s:40"``; default: ten seconds' worth, at least 1). None, ``""``, ``"0"``
        and ``"off"`` disable limiting. The gateway's default is :data:`DEFAULT_RATE_LIMIT`."""
        if spec is None:
            return None
        text = str(spec).strip().lower()
        if text in ("", "0", "off", "none", "unlimited"):
            return None
        burst = None
        if ":" in text:
            text, b = text.split(":", 1)
            burst = float(b)
        per = 60.0
        if "/" in text:
            text, unit = text.split("/", 1)
            units = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
            per = units.get(unit.strip())
            if per is None:
                raise ValueError(f"rate limit unit must be s, min or h, got {unit!r} in {spec!r}")
        count = float(text)
        if not math.isfinite(count) or count < 0:
            raise ValueError(f"rate limit must be a non-negative number, got {spec!r}")
        if count == 0:
            return None
        rate = count / per
        burst = burst if burst is not None else max(1.0, 10.0 * rate)
        if burst < 1:
            raise ValueError(f"rate limit burst must be at least 1, got {burst}")
        return cls(rate=rate, burst=burst)


class RateLimiter:
    """Token buckets, one per client id, forgotten least-recently-used past ``max_clients``."""

    def __init__(self, limit: RateLimit, max_clients: int = 100_000, clock=time.monotonic):
        self.limit = limit
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # id -> (tokens, t)
        self._max = max_clients
        self._clock = clock
        self._lock = threading.Lock()

    def acquire(self, client: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; returns 0 when allowed, else the seconds to wait."""
        now = self._clock()
        with self._lock:
            tokens, t = self._buckets.pop(client, (self.limit.burst, now))
            tokens = min(self.limit.burst, tokens + (now - t) * self.limit.rate)
            wait = 0.0
            if tokens >= cost:
                tokens -= cost
            else:
                wait = (cost - tokens) / self.limit.rate
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        return wait
