"""A PostgreSQL connection the server drops (restart, idle timeout, failover) costs no 500:
the store notices a dead pooled connection and opens a new one, and a failure it cannot hide is
a 503 with Retry-After, after which the next request works."""

from __future__ import annotations

import psycopg
import pytest
from fastapi.testclient import TestClient

from services.common import feedback_store as fs
from services.common.feedback_store import StoreUnavailable, open_store
from services.gateway.app import GatewayConfig, create_app

from .conftest import PG_BASE, make_completion

pytestmark = pytest.mark.postgres


def _drop_connections(store) -> int:
    """Terminate, from another session, every server process of the store's pooled connections."""
    pids = [conn.info.backend_pid for conn, _ in list(store._pool.queue)]
    with psycopg.connect(PG_BASE, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return len(pids)


def test_a_dropped_idle_connection_is_replaced_transparently(pg_url, monkeypatch):
    monkeypatch.setattr(fs, "PG_PING_AFTER_IDLE_S", 0.0)  # every reuse is checked
    with open_store(pg_url) as store:
        store.add_completion(make_completion("c-1"))
        assert _drop_connections(store) >= 1
        assert store.get_completion("c-1").id == "c-1"  # no error: a new connection was opened


def test_a_drop_that_cannot_be_hidden_is_a_503_and_the_next_request_works(pg_url, monkeypatch, fake_backends):
    monkeypatch.setattr(fs, "PG_PING_AFTER_IDLE_S", 3600.0)  # reuse without checking
    with open_store(pg_url) as store:
        store.add_completion(make_completion("c-2"))
        with pytest.raises(StoreUnavailable):
            _drop_connections(store)
            store.get_completion("c-2")
        assert store.get_completion("c-2").id == "c-2"  # the broken connection was not pooled again

        client = TestClient(create_app(fake_backends, store, GatewayConfig()))
        _drop_connections(store)
        r = client.get("/v1/completions/c-2")
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "store_unavailable"
        assert client.get("/v1/completions/c-2").status_code == 200
