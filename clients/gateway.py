"""A small HTTP client of the gateway: best-of-n chat completions and feedback.

Shedding is part of the gateway's contract (429 and 503 with ``Retry-After``), so the client can
wait and retry those a bounded number of times. Feedback posts carry an ``Idempotency-Key``
generated once per logical post, so a retry after a lost reply is stored once, never twice.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx

RETRYABLE_STATUS = frozenset({429, 503})


class GatewayError(Exception):
    """The gateway answered with an error status (its OpenAI-style error body decoded)."""

    def __init__(self, status: int, message: str, type: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.retry_after = retry_after
        super().__init__(f"HTTP {status}: {message}")


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_of(resp: httpx.Response) -> GatewayError:
    try:
        err = resp.json().get("error", {})
        message, type_, code = str(err.get("message") or resp.reason_phrase), err.get("type"), err.get("code")
    except (ValueError, AttributeError):
        message, type_, code = (resp.text[:200] or resp.reason_phrase), None, None
    return GatewayError(resp.status_code, message, type_, code, _retry_after(resp))


class GatewayClient:
    """Calls a gateway at ``url`` (e.g. ``http://127.0.0.1:8000``).

    ``max_retries`` bounds how often a 429/503 or a connection failure is retried; the wait is
    the server's ``Retry-After`` (capped at ``max_wait``) or an exponential backoff.
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 120.0, max_retries: int = 2,
                 max_wait: float = 10.0, transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.max_retries = max_retries
        self.max_wait = max_wait
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __repr__(self) -> str:  # never shows the API key
        return f"GatewayClient({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
                if attempt > self.max_retries:
                    raise GatewayError(0, f"cannot reach the gateway at {self.url}: {e}") from None
                time.sleep(min(self.max_wait, 0.2 * 2 ** (attempt - 1)))
                continue
            if resp.is_success:
                return resp.json()
            err = _error_of(resp)
            if resp.status_code not in RETRYABLE_STATUS or attempt > self.max_retries:
                raise err
            wait = err.retry_after if err.retry_after is not None else 0.2 * 2 ** (attempt - 1)
            time.sleep(min(self.max_wait, wait))

    # -- API --------------------------------------------------------------------------------

    def chat(self, messages: list[dict[str, str]], *, best_of: int | None = None, n: int = 1,
             temperature: float | None = None, max_tokens: int | None = None, seed: int | None = None,
             **extra: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions``; the decoded response (choices best first, each with
        its ``reward``)."""
        body: dict[str, Any] = {"messages": messages, "n": n, **extra}
        for k, v in (("best_of", best_of), ("temperature", temperature), ("max_tokens", max_tokens),
                     ("seed", seed)):
            if v is not None:
                body[k] = v
        return self._request("POST", "/v1/chat/completions", json=body)

    def completion(self, completion_id: str) -> dict[str, Any]:
        """``GET /v1/completions/{id}``: every candidate of a stored completion, in rank order."""
        return self._request("GET", f"/v1/completions/{completion_id}")

    def feedback(self, completion_id: str, *, thumbs: str | None = None, rating: int | None = None,
                 preferred_index: int | None = None, rejected_index: int | None = None,
                 choice_index: int | None = None, comment: str | None = None,
                 idempotency_key: str | None = None) -> dict[str, Any]:
        """``POST /v1/feedback``: thumbs ("up"/"down") or a 1-5 rating of a choice (default the
        first), or a preference between two candidates (rank indices)."""
        body: dict[str, Any] = {"completion_id": completion_id}
        if preferred_index is not None or rejected_index is not None:
            body.update(preferred_index=preferred_index, rejected_index=rejected_index)
        else:
            body["choice_index"] = 0 if choice_index is None else choice_index
            if thumbs is not None:
                body["thumbs"] = thumbs
            if rating is not None:
                body["rating"] = rating
        if comment is not None:
            body["comment"] = comment
        key = idempotency_key or uuid.uuid4().hex  # one key per logical post: retries stored once
        return self._request("POST", "/v1/feedback", json=body, headers={"Idempotency-Key": key})

    def feedback_list(self, completion_id: str) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/feedback", params={"completion_id": completion_id})["data"]

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False
