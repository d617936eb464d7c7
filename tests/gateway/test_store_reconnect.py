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


def test_a_read_on_a_connection_found_dead_mid_query_is_retried_once(pg_url, monkeypatch):
    monkeypatch.setattr(fs, "PG_PING_AFTER_IDLE_S", 3600.0)  # reuse without checking
    with open_store(pg_url) as store:
        store.add_completion(make_completion("c-2"))
        _drop_connections(store)
        assert store.get_completion("c-2").id == "c-2"  # failed once, then ran on a new connection
        assert store.counts()["completions"] == 1


def test_a_write_on_a_dead_connection_is_not_repeated_by_the_store(pg_url, monkeypatch):
    monkeypatch.setattr(fs, "PG_PING_AFTER_IDLE_S", 3600.0)
    with open_store(pg_url) as store:
        store.add_completion(make_completion("c-3"))
        _drop_connections(store)
        with pytest.raises(StoreUnavailable):  # the caller decides (idempotency keys make it safe)
            store.add_completion(make_completion("c-4"))
        assert store.counts()["completions"] == 1


def test_a_database_that_is_down_is_a_503_with_retry_after_and_then_works_again(pg_url, fake_backends):
    with open_store(pg_url) as store:
        store.add_completion(make_completion("c-5"))
        client = TestClient(create_app(fake_backends, store, GatewayConfig()))
        thumbs = {"completion_id": "c-5", "choice_index": 0, "thumbs": "up"}
        good_url = store._pg_url
        store._pg_url = "postgresql://postgres@127.0.0.1:1/test"  # the server goes away
        _drop_connections(store)
        for r in (client.get("/v1/completions/c-5"), client.post("/v1/feedback", json=thumbs)):
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "store_unavailable"
        store._pg_url = good_url  # and comes back
        assert client.get("/v1/completions/c-5").status_code == 200
        assert client.post("/v1/feedback", json=thumbs).status_code == 200
