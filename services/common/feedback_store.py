"""The feedback log: every chat completion the gateway served and what people said about it.

One schema serves two engines. SQLite (a file, WAL mode, ``synchronous=FULL``) is the default
because it needs no set-up; PostgreSQL (psycopg 3) is chosen by a ``postgresql://`` URL when
several gateway replicas share one log. Each write is committed before the call returns, so a
client that heard "ok" can rely on the row being on disk.

The schema evolves through numbered migrations recorded in ``schema_migrations``; they are
applied when a store is opened (under a lock, so replicas starting together do not race).

The same store is the trainer's read side: :meth:`FeedbackStore.iter_feedback` walks feedback
in insertion order from a cursor (``since_id``), :meth:`FeedbackStore.get_completion` returns
the whole interaction (prompt, every candidate with tokens, log-probs and reward, versions).

Candidate indices: a completion's candidates are stored in rank order, best reward first.
Index ``i < n`` is the ``i``-th choice the client was shown; indices ``n .. best_of-1`` are the
candidates that were generated and scored but not returned. Feedback may name any of them.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Empty, LifoQueue
from typing import Any
from urllib.parse import urlparse

FEEDBACK_KINDS = ("thumbs", "rating", "preference")


class StoreError(Exception):
    """Base class of the store's domain errors."""


# a pooled PostgreSQL connection idle longer than this is checked before use
PG_PING_AFTER_IDLE_S = 2.0


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _is_connection_error(e: BaseException) -> bool:
    """Whether ``e`` means the PostgreSQL connection is gone (not a bad statement)."""
    import psycopg

    return isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)) and not isinstance(
        e, psycopg.errors.QueryCanceled
    )


def _read_retried_once(method):
    """A read that fails on a connection found dead mid-query is run once more, on a new one
    (the dead connection was dropped); reads change nothing, so running them twice is safe."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except StoreUnavailable:
            return method(self, *args, **kwargs)

    return wrapper


class StoreUnavailable(StoreError):
    """The database cannot be reached (a dropped connection, a restarting server): the same
    request may succeed shortly, on a new connection."""


class CompletionNotFound(StoreError):
    pass


class InvalidFeedback(StoreError):
    """Feedback that does not fit the stored completion (index out of range, bad value)."""


class IdempotencyConflict(StoreError):
    """An idempotency key was reused for a different request body."""


# --------------------------------------------------------------------------------------------
# records


@dataclass
class CandidateRecord:
    index: int  # rank: 0 is the highest reward
    sample_index: int  # order in which the policy produced it
    text: str  # the cleaned answer the client sees
    raw_text: str  # the policy's decoded output before cleaning
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    reward: float | None
    shown: bool  # returned to the client as one of the n choices
    policy_version: str = ""


@dataclass
class CompletionRecord:
    id: str
    seq: int
    created_at: float
    model: str
    messages: list[dict[str, Any]]
    prompt_text: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    n: int
    best_of: int
    policy_version: str
    reward_version: str
    client_id: str
    latency_ms: float
    candidates: list[CandidateRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FeedbackRecord:
    id: int
    completion_id: str
    kind: str  # thumbs | rating | preference
    choice_index: int | None
    value: int | None  # thumbs: +1 / -1; rating: 1..5
    preferred_index: int | None
    rejected_index: int | None
    comment: str | None
    client_id: str
    idempotency_key: str | None
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# schema

# ``{pk}`` is an auto-incrementing integer primary key, the one spot where the dialects differ.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "completions, candidates, feedback",
        [
            """CREATE TABLE completions (
                seq {pk},
                id TEXT NOT NULL UNIQUE,
                created_at DOUBLE PRECISION NOT NULL,
                model TEXT NOT NULL,
                messages TEXT NOT NULL,
                prompt_text TEXT NOT NULL,
                prompt_token_ids TEXT NOT NULL,
                sampling TEXT NOT NULL,
                n INTEGER NOT NULL,
                best_of INTEGER NOT NULL,
                policy_version TEXT NOT NULL,
                reward_version TEXT NOT NULL,
                client_id TEXT NOT NULL,
                latency_ms DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE candidates (
                completion_id TEXT NOT NULL REFERENCES completions (id) ON DELETE CASCADE,
                idx INTEGER NOT NULL,
                sample_index INTEGER NOT NULL,
                text TEXT NOT NULL,
                raw_text TEXT NOT NULL,
                token_ids TEXT NOT NULL,
                logprobs TEXT NOT NULL,
                finish_reason TEXT NOT NULL,
                reward DOUBLE PRECISION,
                shown INTEGER NOT NULL,
                policy_version TEXT NOT NULL,
                PRIMARY KEY (completion_id, idx)
            )""",
            """CREATE TABLE feedback (
                id {pk},
                completion_id TEXT NOT NULL REFERENCES completions (id) ON DELETE CASCADE,
                kind TEXT NOT NULL CHECK (kind IN ('thumbs', 'rating', 'preference')),
                choice_index INTEGER,
                value INTEGER,
                preferred_index INTEGER,
                rejected_index INTEGER,
                comment TEXT,
                client_id TEXT NOT NULL,
                idempotency_key TEXT,
                request_hash TEXT,
                created_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE UNIQUE INDEX feedback_idempotency ON feedback (client_id, idempotency_key)",
            "CREATE INDEX feedback_completion ON feedback (completion_id)",
            "CREATE INDEX completions_created ON completions (created_at)",
        ],
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]

_PK = {
    "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "postgresql": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
}


def default_database_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir) / 'feedback.db'}"


def _sqlite_path(url: str) -> str:
    # sqlite:///relative.db and sqlite:////abs/path.db, as SQLAlchemy spells them; a plain path too
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///") :]
    if url.startswith("sqlite://"):
        raise ValueError(f"unsupported SQLite URL {url!r}: use sqlite:///path/to/file.db")
    return url


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------
# the store


class FeedbackStore:
    """Durable log of completions and feedback (thread-safe; calls block, run them off the
    event loop).

    Open with :func:`open_store` (or the constructor) and close with :meth:`close`.
    """

    def __init__(self, url: str, *, pool_size: int = 4, connect_timeout: float = 10.0):
        self.url = url
        if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise StoreError(
                    "a postgresql:// database URL needs psycopg, which is not installed: "
                    "pip install 'palm-rlhf[postgres]'"
                ) from None
            self.dialect = "postgresql"
            self._pg_url = url.replace("postgresql+psycopg://", "postgresql://", 1)
        else:
            self.dialect = "sqlite"
            self.path = _sqlite_path(url)
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._connect_timeout = connect_timeout
        self._pool: LifoQueue = LifoQueue()
        self._pool_size = pool_size if self.dialect == "postgresql" else 1
        self._created = 0
        self._pool_lock = threading.Lock()
        self._sem = threading.BoundedSemaphore(self._pool_size)
        self._closed = False
        self.migrate()

    # -- connections ---------------------------------------------------------------------

    def _connect(self):
        if self.dialect == "sqlite":
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is fsynced before it returns (NORMAL may lose the last commits on
            # power loss in WAL mode, which breaks "durable before the client hears ok").
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            return conn
        import psycopg

        try:
            return psycopg.connect(self._pg_url, connect_timeout=int(self._connect_timeout), autocommit=True)
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"the feedback database cannot be reached: {_first_line(e)}") from e

    def _pooled(self):
        """A connection from the pool that still works, else a new one. A PostgreSQL
        connection idle for a while is pinged first: the server may have dropped it (restart,
        idle timeout, failover), which psycopg only notices on the next use."""
        while True:
            try:
                conn, last_used = self._pool.get_nowait()
            except Empty:
                return self._connect()
            if self.dialect == "sqlite":
                return conn
            if conn.closed or conn.broken:
                continue
            if time.monotonic() - last_used < PG_PING_AFTER_IDLE_S:
                return conn
            try:
                conn.execute("SELECT 1")
                return conn
            except Exception:  # noqa: BLE001 -- a dead connection: drop it, try the next
                with suppress(Exception):
                    conn.close()

    @contextmanager
    def _conn(self):
        if self._closed:
            raise StoreError("the feedback store is closed")
        self._sem.acquire()
        try:
            conn = self._pooled()
            ok = False
            try:
                yield conn
                ok = True
            except StoreError:
                ok = True  # a domain error, raised after a clean rollback: the connection is fine
                raise
            except Exception as e:
                if self.dialect == "postgresql" and _is_connection_error(e):
                    raise StoreUnavailable(f"the connection to the feedback database failed: {_first_line(e)}") from e
                raise
            finally:
                if ok or self.dialect == "sqlite":
                    self._pool.put((conn, time.monotonic()))
                else:  # a failed PostgreSQL connection may be broken: drop it
                    with suppress(Exception):
                        conn.close()
        finally:
            self._sem.release()

    @contextmanager
    def _tx(self, write: bool = True):
        """A transaction; yields ``execute(sql, params) -> cursor`` with ``?`` placeholders."""
        with self._conn() as conn:
            if self.dialect == "sqlite":
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

                def execute(sql: str, params: Sequence[Any] = ()):
                    return conn.execute(sql, params)

                try:
                    yield execute
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            else:
                with conn.transaction():
                    cur = conn.cursor()

                    def execute(sql: str, params: Sequence[Any] = ()):
                        cur.execute(sql.replace("?", "%s"), params)
                        return cur

                    yield execute

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._pool.get_nowait()[0].close()
            except Empty:
                break

    def __enter__(self) -> FeedbackStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- migrations ----------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied now."""
        applied_now = []
        with self._tx() as ex:
            if self.dialect == "postgresql":
                ex("SELECT pg_advisory_xact_lock(?)", (0x70616C6D,))  # one migrator at a time
            ex(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
            )
            done = {row[0] for row in ex("SELECT version FROM schema_migrations").fetchall()}
            if done and max(done) > SCHEMA_VERSION:
                raise StoreError(
                    f"the database schema is at version {max(done)}, newer than this code's "
                    f"{SCHEMA_VERSION}; upgrade the gateway"
                )
            for version, name, statements in MIGRATIONS:
                if version in done:
                    continue
                for sql in statements:
                    ex(sql.replace("{pk}", _PK[self.dialect]))
                ex(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, time.time()),
                )
                applied_now.append(version)
        return applied_now

    def schema_versions(self) -> list[int]:
        with self._tx(write=False) as ex:
            return [r[0] for r in ex("SELECT version FROM schema_migrations ORDER BY version").fetchall()]

    def ping(self) -> None:
        with self._tx(write=False) as ex:
            ex("SELECT 1").fetchall()

    # -- writes --------------------------------------------------------------------------

    def add_completion(self, record: CompletionRecord) -> CompletionRecord:
        """Store a completion with all its candidates in one transaction; sets ``record.seq``."""
        with self._tx() as ex:
            cur = ex(
                "INSERT INTO completions (id, created_at, model, messages, prompt_text, prompt_token_ids,"
                " sampling, n, best_of, policy_version, reward_version, client_id, latency_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                (
                    record.id,
                    record.created_at,
                    record.model,
                    json.dumps(record.messages),
                    record.prompt_text,
                    json.dumps(record.prompt_token_ids),
                    json.dumps(record.sampling),
                    record.n,
                    record.best_of,
                    record.policy_version,
                    record.reward_version,
                    record.client_id,
                    record.latency_ms,
                ),
            )
            record.seq = int(cur.fetchone()[0])
            for c in record.candidates:
                ex(
                    "INSERT INTO candidates (completion_id, idx, sample_index, text, raw_text, token_ids,"
                    " logprobs, finish_reason, reward, shown, policy_version)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        c.index,
                        c.sample_index,
                        c.text,
                        c.raw_text,
                        json.dumps(c.token_ids),
                        json.dumps([_finite_or_none(x) for x in c.logprobs]),
                        c.finish_reason,
                        _finite_or_none(c.reward),
                        1 if c.shown else 0,
                        c.policy_version,
                    ),
                )
        return record

    def add_feedback(
        self,
        completion_id: str,
        *,
        kind: str,
        choice_index: int | None = None,
        value: int | None = None,
        preferred_index: int | None = None,
        rejected_index: int | None = None,
        comment: str | None = None,
        client_id: str = "",
        idempotency_key: str | None = None,
    ) -> tuple[FeedbackRecord, bool]:
        """Validate feedback against the stored completion and store it.

        Returns ``(record, created)``; ``created`` is False when ``idempotency_key`` had already
        been used by this client for the same feedback, in which case the first record is
        returned unchanged. Raises CompletionNotFound, InvalidFeedback, IdempotencyConflict.
        """
        if kind not in FEEDBACK_KINDS:
            raise InvalidFeedback(f"kind must be one of {FEEDBACK_KINDS}, got {kind!r}")
        if kind in ("thumbs", "rating"):
            if choice_index is None or value is None:
                raise InvalidFeedback(f"{kind} feedback needs choice_index and a value")
            if kind == "thumbs" and value not in (-1, 1):
                raise InvalidFeedback(f"thumbs value must be +1 or -1, got {value!r}")
            if kind == "rating" and not 1 <= value <= 5:
                raise InvalidFeedback(f"rating must be an integer from 1 to 5, got {value!r}")
            preferred_index = rejected_index = None
        else:
            if preferred_index is None or rejected_index is None:
                raise InvalidFeedback("preference feedback needs preferred_index and rejected_index")
            if preferred_index == rejected_index:
                raise InvalidFeedback("preferred_index and rejected_index must name different candidates")
            choice_index = value = None
        request_hash = json.dumps(
            [completion_id, kind, choice_index, value, preferred_index, rejected_index, comment]
        )
        if idempotency_key is not None:
            existing = self._by_idempotency_key(client_id, idempotency_key)
            if existing is not None:
                return self._replay(existing, request_hash), False
        try:
            with self._tx() as ex:
                row = ex("SELECT best_of FROM completions WHERE id = ?", (completion_id,)).fetchone()
                if row is None:
                    raise CompletionNotFound(f"no completion with id {completion_id!r}")
                count = int(row[0])
                for name, idx in (
                    ("choice_index", choice_index),
                    ("preferred_index", preferred_index),
                    ("rejected_index", rejected_index),
                ):
                    if idx is not None and not 0 <= idx < count:
                        raise InvalidFeedback(
                            f"{name} {idx} is out of range: completion {completion_id} has {count} "
                            f"candidate(s), indices 0..{count - 1}"
                        )
                now = time.time()
                cur = ex(
                    "INSERT INTO feedback (completion_id, kind, choice_index, value, preferred_index,"
                    " rejected_index, comment, client_id, idempotency_key, request_hash, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (
                        completion_id,
                        kind,
                        choice_index,
                        value,
                        preferred_index,
                        rejected_index,
                        comment,
                        client_id,
                        idempotency_key,
                        request_hash,
                        now,
                    ),
                )
                fid = int(cur.fetchone()[0])
        except StoreError:
            raise
        except Exception as e:
            # a concurrent retry with the same key won the unique index: answer with its row
            if idempotency_key is not None and _is_unique_violation(e):
                existing = self._by_idempotency_key(client_id, idempotency_key)
                if existing is not None:
                    return self._replay(existing, request_hash), False
            raise
        rec = FeedbackRecord(
            id=fid,
            completion_id=completion_id,
            kind=kind,
            choice_index=choice_index,
            value=value,
            preferred_index=preferred_index,
            rejected_index=rejected_index,
            comment=comment,
            client_id=client_id,
            idempotency_key=idempotency_key,
            created_at=now,
        )
        return rec, True

    def _by_idempotency_key(self, client_id: str, key: str) -> tuple[FeedbackRecord, str] | None:
        with self._tx(write=False) as ex:
            row = ex(
                f"SELECT {_FEEDBACK_COLS}, request_hash FROM feedback"
                " WHERE client_id = ? AND idempotency_key = ?",
                (client_id, key),
            ).fetchone()
        if row is None:
            return None
        return _feedback_from_row(row[:-1]), row[-1]

    @staticmethod
    def _replay(existing: tuple[FeedbackRecord, str], request_hash: str) -> FeedbackRecord:
        rec, stored_hash = existing
        if stored_hash != request_hash:
            raise IdempotencyConflict(
                f"Idempotency-Key {rec.idempotency_key!r} was already used for a different feedback body"
            )
        return rec

    # -- reads ---------------------------------------------------------------------------

    @_read_retried_once
    def get_completion(self, completion_id: str, *, with_candidates: bool = True) -> CompletionRecord:
        """The whole interaction; raises CompletionNotFound."""
        with self._tx(write=False) as ex:
            row = ex(f"SELECT {_COMPLETION_COLS} FROM completions WHERE id = ?", (completion_id,)).fetchone()
            if row is None:
                raise CompletionNotFound(f"no completion with id {completion_id!r}")
            rec = _completion_from_row(row)
            if with_candidates:
                rec.candidates = self._candidates(ex, [rec.id])[rec.id]
        return rec

    def _candidates(self, ex, ids: list[str]) -> dict[str, list[CandidateRecord]]:
        out: dict[str, list[CandidateRecord]] = {i: [] for i in ids}
        if not ids:
            return out
        marks = ", ".join("?" for _ in ids)
        rows = ex(
            "SELECT completion_id, idx, sample_index, text, raw_text, token_ids, logprobs, finish_reason,"
            f" reward, shown, policy_version FROM candidates WHERE completion_id IN ({marks})"
            " ORDER BY completion_id, idx",
            ids,
        ).fetchall()
        for r in rows:
            out[r[0]].append(
                CandidateRecord(
                    index=r[1],
                    sample_index=r[2],
                    text=r[3],
                    raw_text=r[4],
                    token_ids=json.loads(r[5]),
                    logprobs=json.loads(r[6]),
                    finish_reason=r[7],
                    reward=r[8],
                    shown=bool(r[9]),
                    policy_version=r[10],
                )
            )
        return out

    @_read_retried_once
    def list_completions(
        self,
        *,
        after_seq: int = 0,
        limit: int = 100,
        with_candidates: bool = False,
        with_feedback_only: bool = False,
    ) -> list[CompletionRecord]:
        """Completions in insertion order after ``after_seq`` (a cursor: pass the last ``seq``)."""
        where = "seq > ?"
        if with_feedback_only:
            where += " AND EXISTS (SELECT 1 FROM feedback f WHERE f.completion_id = completions.id)"
        with self._tx(write=False) as ex:
            rows = ex(
                f"SELECT {_COMPLETION_COLS} FROM completions WHERE {where} ORDER BY seq LIMIT ?",
                (after_seq, int(limit)),
            ).fetchall()
            recs = [_completion_from_row(r) for r in rows]
            if with_candidates and recs:
                cands = self._candidates(ex, [r.id for r in recs])
                for r in recs:
                    r.candidates = cands[r.id]
        return recs

    @_read_retried_once
    def list_feedback(self, completion_id: str) -> list[FeedbackRecord]:
        """Feedback on one completion, oldest first; raises CompletionNotFound."""
        with self._tx(write=False) as ex:
            if ex("SELECT 1 FROM completions WHERE id = ?", (completion_id,)).fetchone() is None:
                raise CompletionNotFound(f"no completion with id {completion_id!r}")
            rows = ex(
                f"SELECT {_FEEDBACK_COLS} FROM feedback WHERE completion_id = ? ORDER BY id",
                (completion_id,),
            ).fetchall()
        return [_feedback_from_row(r) for r in rows]

    def iter_feedback(
        self, since_id: int = 0, *, kinds: Sequence[str] | None = None, batch_size: int = 500
    ) -> Iterator[FeedbackRecord]:
        """Feedback with ``id > since_id`` in insertion order; remember the last ``id`` seen and
        pass it next time to read only what is new. Reads in batches (no long transaction)."""
        last = int(since_id)
        kind_sql, kind_params = "", []
        if kinds:
            kind_sql = f" AND kind IN ({', '.join('?' for _ in kinds)})"
            kind_params = list(kinds)
        while True:
            with self._tx(write=False) as ex:
                rows = ex(
                    f"SELECT {_FEEDBACK_COLS} FROM feedback WHERE id > ?{kind_sql} ORDER BY id LIMIT ?",
                    [last, *kind_params, batch_size],
                ).fetchall()
            for r in rows:
                rec = _feedback_from_row(r)
                last = rec.id
                yield rec
            if len(rows) < batch_size:
                return

    @_read_retried_once
    def count_feedback_since(self, since_id: int = 0) -> int:
        """How many feedback rows have ``id > since_id`` (the trainer's "new feedback" count)."""
        with self._tx(write=False) as ex:
            row = ex("SELECT COUNT(*) FROM feedback WHERE id > ?", [int(since_id)]).fetchone()
        return int(row[0])

    def iter_preference_pairs(self, since_id: int = 0) -> Iterator[dict[str, Any]]:
        """Explicit preferences as training pairs: prompt text, chosen and rejected answers
        (cleaned text and token ids), with the feedback id as cursor."""
        cache: dict[str, CompletionRecord] = {}
        for fb in self.iter_feedback(since_id, kinds=("preference",)):
            comp = cache.get(fb.completion_id) or self.get_completion(fb.completion_id)
            cache[fb.completion_id] = comp
            chosen, rejected = comp.candidates[fb.preferred_index], comp.candidates[fb.rejected_index]
            yield {
                "feedback_id": fb.id,
                "completion_id": comp.id,
                "prompt_text": comp.prompt_text,
                "prompt_token_ids": comp.prompt_token_ids,
                "chosen": chosen.text,
                "rejected": rejected.text,
                "chosen_token_ids": chosen.token_ids,
                "rejected_token_ids": rejected.token_ids,
                "policy_version": comp.policy_version,
            }

    @_read_retried_once
    def counts(self) -> dict[str, int]:
        """Row counts: completions, candidates, feedback, and feedback per kind."""
        with self._tx(write=False) as ex:
            out = {
                "completions": int(ex("SELECT COUNT(*) FROM completions").fetchone()[0]),
                "candidates": int(ex("SELECT COUNT(*) FROM candidates").fetchone()[0]),
                "feedback": int(ex("SELECT COUNT(*) FROM feedback").fetchone()[0]),
            }
            for kind in FEEDBACK_KINDS:
                out[f"feedback_{kind}"] = 0
            for kind, c in ex("SELECT kind, COUNT(*) FROM feedback GROUP BY kind").fetchall():
                out[f"feedback_{kind}"] = int(c)
        return out

    def iter_export(
        self, *, after_seq: int = 0, with_feedback_only: bool = False
    ) -> Iterator[dict[str, Any]]:
        """One dict per completion (the export's JSONL lines): the completion with every
        candidate and all its feedback, in insertion order."""
        cursor = after_seq
        while True:
            recs = self.list_completions(
                after_seq=cursor, limit=200, with_candidates=True, with_feedback_only=with_feedback_only
            )
            if not recs:
                return
            ids = [r.id for r in recs]
            with self._tx(write=False) as ex:
                marks = ", ".join("?" for _ in ids)
                rows = ex(
                    f"SELECT {_FEEDBACK_COLS} FROM feedback WHERE completion_id IN ({marks}) ORDER BY id",
                    ids,
                ).fetchall()
            fbs: dict[str, list[dict]] = {i: [] for i in ids}
            for r in rows:
                fb = _feedback_from_row(r)
                fbs[fb.completion_id].append(fb.to_dict())
            for r in recs:
                d = r.to_dict()
                d["feedback"] = fbs[r.id]
                yield d
                cursor = r.seq

    def export_jsonl(self, out, **kw: Any) -> int:
        """Write :meth:`iter_export` to a text stream; returns the number of lines."""
        n = 0
        for d in self.iter_export(**kw):
            out.write(json.dumps(d, separators=(",", ":")) + "\n")
            n += 1
        return n


_COMPLETION_COLS = (
    "seq, id, created_at, model, messages, prompt_text, prompt_token_ids, sampling, n, best_of,"
    " policy_version, reward_version, client_id, latency_ms"
)
_FEEDBACK_COLS = (
    "id, completion_id, kind, choice_index, value, preferred_index, rejected_index, comment,"
    " client_id, idempotency_key, created_at"
)


def _completion_from_row(r) -> CompletionRecord:
    return CompletionRecord(
        seq=int(r[0]),
        id=r[1],
        created_at=float(r[2]),
        model=r[3],
        messages=json.loads(r[4]),
        prompt_text=r[5],
        prompt_token_ids=json.loads(r[6]),
        sampling=json.loads(r[7]),
        n=int(r[8]),
        best_of=int(r[9]),
        policy_version=r[10],
        reward_version=r[11],
        client_id=r[12],
        latency_ms=float(r[13]),
    )


def _feedback_from_row(r) -> FeedbackRecord:
    return FeedbackRecord(
        id=int(r[0]),
        completion_id=r[1],
        kind=r[2],
        choice_index=r[3],
        value=r[4],
        preferred_index=r[5],
        rejected_index=r[6],
        comment=r[7],
        client_id=r[8],
        idempotency_key=r[9],
        created_at=float(r[10]),
    )


def _is_unique_violation(e: Exception) -> bool:
    if isinstance(e, sqlite3.IntegrityError):
        return "UNIQUE" in str(e)
    try:
        import psycopg

        return isinstance(e, psycopg.errors.UniqueViolation)
    except ImportError:  # pragma: no cover
        return False


def open_store(url: str, **kw: Any) -> FeedbackStore:
    """Open (and migrate) the store named by a database URL: ``sqlite:///path.db`` or
    ``postgresql://user@host:port/db`` (add ``?options=-csearch_path%3Dmyschema`` for a schema)."""
    scheme = urlparse(url).scheme
    if scheme and scheme not in ("sqlite", "postgresql", "postgres", "postgresql+psycopg"):
        raise ValueError(f"unsupported database URL scheme {scheme!r}: use sqlite:/// or postgresql://")
    return FeedbackStore(url, **kw)
