"""Admission control on a real socket: overload is shed with 503, a client that disconnects
stops its generation and leaves nothing stored, and a stalled request body is cut off."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.app import GatewayConfig, create_app

from .conftest import FakeBackends, ThreadServer

CHAT = {"model": "palm-rlhf", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


class SlowBackends(FakeBackends):
    """Generation that takes ``hold_s`` and records whether it ran to the end or was cancelled."""

    def __init__(self, hold_s: float):
        super().__init__()
        self.hold_s = hold_s
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    async def generate(self, prompt_text, n, params):
        self.started.set()
        try:
            await asyncio.sleep(self.hold_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished.set()
        return self._sample(prompt_text, n, params)

    async def generate_stream(self, prompt_text, n, params):
        self.started.set()
        try:
            first = True
            async for ev in super().generate_stream(prompt_text, n, params):
                # the first frame at once, then hold_s per frame: a stream of a few frames outlasts
                # any wait for a disconnect, even on a loaded machine
                if not first:
                    await asyncio.sleep(self.hold_s)
                first = False
                yield ev
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.set()
            raise
        self.finished.set()


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    text = httpx.get(url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    return None


def test_over_the_inflight_cap_is_shed_with_503(sqlite_store):
    backends = SlowBackends(hold_s=1.5)
    app = create_app(backends, sqlite_store, GatewayConfig(max_inflight=1))
    with ThreadServer(app) as srv:
        results: list[httpx.Response] = []
        first = threading.Thread(
            target=lambda: results.append(httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30))
        )
        first.start()
        assert backends.started.wait(10)
        t0 = time.monotonic()
        shed = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30)
        waited = time.monotonic() - t0
        first.join(30)
        assert shed.status_code == 503, shed.text
        assert shed.headers["Retry-After"] == "1"
        assert shed.json()["error"]["code"] == "overloaded"
        assert waited < 1.0, "a request over the cap must be refused at once, not queued"
        assert results and results[0].status_code == 200
        assert metric(srv.url, "gateway_shed_total", {"reason": "inflight_cap"}) == 1.0
        assert metric(srv.url, "gateway_inflight_chat_completions") == 0.0
        # with the slot free again, the next request is served
        assert httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def _raw_request(url: str, body: bytes, send_bytes: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) if send_bytes is None else send_bytes])
    return sock


def test_a_client_that_disconnects_stops_its_generation_and_nothing_is_stored(sqlite_store):
    import json

    backends = SlowBackends(hold_s=5.0)
    app = create_app(backends, sqlite_store, GatewayConfig())
    with ThreadServer(app) as srv:
        before = sqlite_store.counts()
        sock = _raw_request(srv.url, json.dumps(CHAT).encode())
        assert backends.started.wait(10)
        sock.close()  # the client gives up
        assert backends.cancelled.wait(5), "the generation went on for a client that had gone"
        assert not backends.finished.is_set()
        deadline = time.monotonic() + 5
        while metric(srv.url, "gateway_client_gone_total") != 1.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(srv.url, "gateway_client_gone_total") == 1.0
        assert metric(srv.url, "gateway_inflight_chat_completions") == 0.0
        assert sqlite_store.counts() == before, "a completion nobody received was stored"
        # a client that waits gets its answer
        backends.hold_s = 0.1
        assert httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_a_streamed_completion_releases_its_slot_when_the_client_leaves(sqlite_store):
    backends = SlowBackends(hold_s=4.0)
    app = create_app(backends, sqlite_store, GatewayConfig(max_inflight=1))
    with ThreadServer(app) as srv:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first frame, then hang up
        assert backends.cancelled.wait(10), "the stream went on decoding for a client that had gone"
        deadline = time.monotonic() + 5
        while metric(srv.url, "gateway_inflight_chat_completions") != 0.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(srv.url, "gateway_inflight_chat_completions") == 0.0
        backends.hold_s = 0.1
        ok = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert ok.status_code == 200, "the cap of 1 must be free again after the stream ended"


def test_a_stalled_request_body_is_cut_off_with_408(sqlite_store):
    backends = FakeBackends()
    app = create_app(backends, sqlite_store, GatewayConfig(body_timeout_s=0.5))
    with ThreadServer(app) as srv:
        sock = _raw_request(srv.url, b'{"model": "palm-rlhf", "messages": []}', send_bytes=10)
        t0 = time.monotonic()
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        elapsed = time.monotonic() - t0
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"did not arrive within 0.5 s" in reply
        assert elapsed < 10, "the connection must be closed after the 408"
        assert backends.calls == []


class _Server(ThreadServer):
    def __init__(self, app, **config):
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", **config)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (None if it stayed open ``seconds``)."""
    sock.settimeout(seconds)
    t0 = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_request_headers_sent_too_slowly_get_the_connection_closed(sqlite_store):
    from services.gateway.http_protocol import protocol_with

    app = create_app(FakeBackends(), sqlite_store, GatewayConfig())
    with _Server(app, http=protocol_with(1.0)) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)), timeout=10)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        took = _closed_within(slow, 8.0)
        slow.close()
        assert took is not None and took < 5.0, "a connection with unfinished headers was kept open"
        # a normal client on a kept-alive connection is not cut: idle time between requests is
        # the keep-alive's business, and each request's headers arrive at once
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/healthz").status_code == 200
            time.sleep(1.5)
            assert c.get("/healthz").status_code == 200
        # the clock restarts with each request on a connection: a second, stalled request is cut too
        conn = socket.create_connection((host, int(port)), timeout=10)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in conn.recv(65536)
        time.sleep(1.5)
        conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        took = _closed_within(conn, 8.0)
        conn.close()
        assert took is not None and took < 5.0


def test_page_security_headers_and_the_host_allow_list(sqlite_store):
    app = create_app(FakeBackends(), sqlite_store, GatewayConfig(allowed_hosts=("127.0.0.1", "*.example.com")))
    with ThreadServer(app) as srv:
        page = httpx.get(srv.url + "/", timeout=10)
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        api = httpx.get(srv.url + "/healthz", timeout=10)
        assert api.headers["x-content-type-options"] == "nosniff" and api.headers["x-frame-options"] == "DENY"
        assert httpx.get(srv.url + "/healthz", headers={"Host": "api.example.com"}, timeout=10).status_code == 200
        assert httpx.get(srv.url + "/healthz", headers={"Host": "evil.test"}, timeout=10).status_code == 400
