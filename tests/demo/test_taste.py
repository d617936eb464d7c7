"""The simulated raters are polite clients: a 429 from the gateway's rate limit (which all of
them share from one address) is waited out for its Retry-After, not a crash of the session."""

from __future__ import annotations

import httpx
import pytest

from palm_rlhf.demo.taste import _post


def _client(refusals: int) -> tuple[httpx.Client, list[str]]:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if len(seen) <= refusals:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"code": "rate_limit_exceeded"}})
        return httpx.Response(200, json={"ok": True})

    return httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(answer)), seen


def test_a_rate_limited_request_is_sent_again_after_retry_after():
    http, seen = _client(refusals=3)
    assert _post(http, "/v1/feedback", {"x": 1}).json() == {"ok": True}
    assert seen == ["/v1/feedback"] * 4


def test_a_client_refused_every_time_gives_up_with_the_429():
    http, seen = _client(refusals=100)
    with pytest.raises(httpx.HTTPStatusError) as e:
        _post(http, "/v1/feedback", {"x": 1}, attempts=5)
    assert e.value.response.status_code == 429 and len(seen) == 5
