"""The feedback store on SQLite (a real file) and PostgreSQL (a schema of its own per test)."""

from __future__ import annotations

import io
import json
import sqlite3
import threading

import pytest

from services.common.feedback_store import (
    SCHEMA_VERSION,
    CompletionNotFound,
    IdempotencyConflict,
    InvalidFeedback,
    open_store,
)

from .conftest import make_completion


def test_migrations_are_recorded_and_applied_once(store, store_url):
    assert store.schema_versions() == list(range(1, SCHEMA_VERSION + 1))
    again = open_store(store_url)
    try:
        assert again.migrate() == []  # nothing pending
        assert again.schema_versions() == list(range(1, SCHEMA_VERSION + 1))
    finally:
        again.close()


def test_completion_round_trips_with_every_candidate(store):
    rec = make_completion(best_of=4, n=2)
    store.add_completion(rec)
    got = store.get_completion(rec.id)
    assert got.seq == rec.seq > 0
    assert got.messages == rec.messages and got.prompt_text == rec.prompt_text
    assert got.sampling == rec.sampling and got.prompt_token_ids == rec.prompt_token_ids
    assert [c.index for c in got.candidates] == [0, 1, 2, 3]
    for a, b in zip(got.candidates, rec.candidates):
        assert (a.text, a.raw_text, a.token_ids, a.finish_reason, a.shown) == (
            b.text,
            b.raw_text,
            b.token_ids,
            b.finish_reason,
            b.shown,
        )
        assert a.logprobs == pytest.approx(b.logprobs)
        assert a.reward == pytest.approx(b.reward)
    assert [c.shown for c in got.candidates] == [True, True, False, False]
    with pytest.raises(CompletionNotFound):
        store.get_completion("chatcmpl-missing")


def test_feedback_is_validated_against_the_stored_completion(store):
    rec = store.add_completion(make_completion(best_of=3))
    with pytest.raises(CompletionNotFound):
        store.add_feedback("nope", kind="thumbs", choice_index=0, value=1)
    with pytest.raises(InvalidFeedback, match="out of range"):
        store.add_feedback(rec.id, kind="thumbs", choice_index=3, value=1)
    with pytest.raises(InvalidFeedback, match="out of range"):
        store.add_feedback(rec.id, kind="preference", preferred_index=0, rejected_index=-1)
    with pytest.raises(InvalidFeedback):
        store.add_feedback(rec.id, kind="rating", choice_index=0, value=6)
    with pytest.raises(InvalidFeedback):
        store.add_feedback(rec.id, kind="preference", preferred_index=1, rejected_index=1)
    fb, created = store.add_feedback(
        rec.id, kind="preference", preferred_index=2, rejected_index=0, comment="x"
    )
    assert created and fb.kind == "preference" and (fb.preferred_index, fb.rejected_index) == (2, 0)
    assert store.counts()["feedback"] == 1  # the invalid ones left nothing behind


def test_idempotency_key_stores_a_retry_once_and_rejects_a_different_body(store):
    rec = store.add_completion(make_completion())
    first, created1 = store.add_feedback(
        rec.id, kind="rating", choice_index=0, value=4, client_id="a", idempotency_key="k1"
    )
    again, created2 = store.add_feedback(
        rec.id, kind="rating", choice_index=0, value=4, client_id="a", idempotency_key="k1"
    )
    assert created1 and not created2 and again == first
    with pytest.raises(IdempotencyConflict):
        store.add_feedback(
            rec.id, kind="rating", choice_index=0, value=2, client_id="a", idempotency_key="k1"
        )
    # keys are scoped per client
    _, created3 = store.add_feedback(
        rec.id, kind="rating", choice_index=0, value=4, client_id="b", idempotency_key="k1"
    )
    assert created3
    assert store.counts()["feedback_rating"] == 2


def test_concurrent_retries_with_one_key_count_once(store):
    rec = store.add_completion(make_completion())
    results, errors = [], []

    def post():
        try:
            results.append(
                store.add_feedback(
                    rec.id, kind="thumbs", choice_index=0, value=1, client_id="c", idempotency_key="same"
                )
            )
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({fb.id for fb, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert store.counts()["feedback_thumbs"] == 1


def test_iter_feedback_is_a_cursor_over_new_rows(store):
    a = store.add_completion(make_completion())
    b = store.add_completion(make_completion())
    f1, _ = store.add_feedback(a.id, kind="thumbs", choice_index=0, value=-1)
    f2, _ = store.add_feedback(b.id, kind="rating", choice_index=1, value=5)
    f3, _ = store.add_feedback(a.id, kind="preference", preferred_index=1, rejected_index=0)
    assert [f.id for f in store.iter_feedback()] == [f1.id, f2.id, f3.id]
    assert [f.id for f in store.iter_feedback(since_id=f1.id)] == [f2.id, f3.id]
    assert [f.id for f in store.iter_feedback(0, batch_size=1)] == [f1.id, f2.id, f3.id]
    assert [f.kind for f in store.iter_feedback(0, kinds=["preference"])] == ["preference"]
    pairs = list(store.iter_preference_pairs())
    assert len(pairs) == 1
    assert pairs[0]["chosen"] == a.candidates[1].text and pairs[0]["rejected"] == a.candidates[0].text
    assert store.list_feedback(a.id)[0].id == f1.id
    counts = store.counts()
    assert counts["completions"] == 2 and counts["candidates"] == 6 and counts["feedback"] == 3


def test_list_completions_pages_by_seq_and_export_carries_feedback(store):
    recs = [store.add_completion(make_completion()) for _ in range(5)]
    page1 = store.list_completions(limit=2)
    page2 = store.list_completions(after_seq=page1[-1].seq, limit=10, with_candidates=True)
    assert [r.id for r in page1 + page2] == [r.id for r in recs]
    assert all(len(r.candidates) == 3 for r in page2)
    store.add_feedback(recs[3].id, kind="thumbs", choice_index=0, value=1)
    assert [r.id for r in store.list_completions(with_feedback_only=True)] == [recs[3].id]
    buf = io.StringIO()
    assert store.export_jsonl(buf) == 5
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [d["id"] for d in lines] == [r.id for r in recs]
    assert lines[3]["feedback"][0]["value"] == 1 and lines[0]["feedback"] == []
    assert lines[0]["candidates"][0]["token_ids"] == recs[0].candidates[0].token_ids


def test_a_commit_is_visible_to_another_connection_at_once(store, store_url):
    rec = store.add_completion(make_completion())
    store.add_feedback(rec.id, kind="thumbs", choice_index=0, value=1)
    other = open_store(store_url)
    try:
        assert other.counts()["feedback"] == 1
        assert other.get_completion(rec.id).id == rec.id
    finally:
        other.close()


def test_sqlite_file_uses_wal_and_full_sync(sqlite_store):
    conn = sqlite3.connect(sqlite_store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"schema_migrations", "completions", "candidates", "feedback"} <= names
    finally:
        conn.close()
    with sqlite_store._conn() as c:
        assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_newer_schema_in_the_database_is_refused(sqlite_store):
    with sqlite_store._tx() as ex:
        ex("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)", (999, "future", 0.0))
    with pytest.raises(Exception, match="newer than this code"):
        open_store(sqlite_store.url)
