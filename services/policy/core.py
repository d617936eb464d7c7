"""The policy core: validation, dynamic batching and atomic version swaps, free of gRPC.

Requests are queued. When the model is idle, one batcher task (after an optional window, so
requests sent together arrive together) starts a batch in a worker thread, so the event loop
stays responsive. The batch is a :class:`~palm_rlhf.generation.DecodeSession`: between two
decode steps the worker moves queued requests into it (continuous batching), and rows leave
it as soon as they finish, so a short request never waits for a long one to end. A batch
captures the served model object when it starts, and only requests for that object join it:
a version swap replaces the object for the next batch and never touches weights in use, so
every request runs on one version and reports it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from palm_rlhf.generation import DecodeSession, SamplingParams
from palm_rlhf.stops import scan_stops
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    Overloaded,
    ResourceExhausted,
    Unavailable,
)
from services.common.metrics import ServiceMetrics
from services.common.models import LoadedPalm, load_palm_version, version_path

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # alternatives per generated token, as OpenAI's API allows

# Stop this long before a caller's deadline, so the reply (or the final stream chunk) can
# still reach it in time.
DEADLINE_MARGIN_S = 0.05


@dataclass
class PolicyLimits:
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    default_max_new_tokens: int = 64
    max_n: int = 16
    max_batch: int = 64  # prompts per request
    max_batch_rows: int = 128  # prompts x samples per model batch
    # prompts x samples waiting for the running batch; a request beyond it is refused at once
    # (Overloaded, RESOURCE_EXHAUSTED marked as retryable) instead of waiting behind them (0: no cap)
    max_queue_rows: int = 512
    batch_window_s: float = 0.0
    # A large batch is compute-bound and gains from every core; a small one is bound by memory
    # and by this process's own event loop, which extra OpenMP threads would crowd out.
    batch_threads: int = 0  # torch threads for batches of >= batch_threads_min_rows rows (0: unchanged)
    batch_threads_min_rows: int = 16
    base_threads: int = 1  # torch threads for the other batches (--torch-threads)


@dataclass
class GenParams:
    """Sampling parameters of one request; None means "the default"."""

    n: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None
    return_logprobs: bool = False
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int | None = None
    ignore_eos: bool = False
    top_logprobs: int = 0  # with return_logprobs: alternatives per token


# (token id, log-prob, bytes) of one alternative
Alternative = tuple[int, float, bytes]


@dataclass
class CandidateOut:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    matched_stop: str = ""
    token_bytes: list[bytes] = field(default_factory=list)  # with return_logprobs
    top_logprobs: list[list[Alternative]] = field(default_factory=list)  # with top_logprobs


@dataclass
class GenerationOut:
    prompt_token_ids: list[list[int]]
    candidates: list[list[CandidateOut]]  # per prompt, n each
    version: str

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for cs in self.candidates for c in cs)


@dataclass
class StreamEvent:
    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None
    version: str
    prompt_token_ids: list[int] = field(default_factory=list)
    token_bytes: list[bytes] = field(default_factory=list)
    top_logprobs: list[list[Alternative]] = field(default_factory=list)


def _byte_level_chars() -> dict[str, int]:
    """The printable character a byte-level BPE writes for each byte, inverted: the 188
    printable Latin-1 bytes stand for themselves, the others for U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {chr(b): b for b in kept}
    extra = 0
    for b in range(256):
        if b not in chars.values():
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_chars()
_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hf_token_bytes(tok, token_id: int) -> bytes:
    inner = tok._tok
    added = inner.get_added_tokens_decoder()
    if token_id in added and added[token_id].special:
        return b""
    piece = inner.id_to_token(token_id)
    if piece is None:
        return b""
    if type(inner.decoder).__name__ == "ByteLevel" and token_id not in added and all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    return tok.decode([token_id]).encode("utf-8")


def token_bytes(tok, token_id: int) -> bytes:
    """The bytes a token stands for in text (empty for a special token): for a byte-level BPE
    the token's own bytes, even when they are part of a multi-byte character."""
    if getattr(tok, "kind", "") == "byte":
        off = tok.OFFSET
        return bytes([token_id - off]) if off <= token_id < tok.vocab_size else b""
    try:
        cache = _TOKEN_BYTES.setdefault(tok, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        cache = {}
    out = cache.get(token_id)
    if out is None:
        out = cache[token_id] = _hf_token_bytes(tok, token_id) if hasattr(tok, "_tok") else \
            tok.decode([token_id]).encode("utf-8")
    return out


class _Row:
    """Decoding state of one (prompt, sample) of one request inside a batch."""

    __slots__ = (
        "announced",
        "done",
        "emitted",
        "ids",
        "lps",
        "matched",
        "prompt_index",
        "reason",
        "req",
        "sample_index",
        "tops",
    )

    def __init__(self, req: _Request, prompt_index: int, sample_index: int):
        self.req, self.prompt_index, self.sample_index = req, prompt_index, sample_index
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.done = False
        self.emitted = ""  # streamed text so far
        self.matched = ""
        self.reason = "length"
        self.announced = False  # whether a chunk of this row has been streamed yet


class _Request:
    """A validated request waiting for, or running in, a batch."""

    def __init__(self, prompts: list[list[int]], sp: SamplingParams, params: GenParams, deadline: float | None,
                 loop: asyncio.AbstractEventLoop, stream: bool):
        self.prompts = prompts
        self.sp = sp
        self.params = params
        self.deadline = deadline
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.queue: asyncio.Queue | None = asyncio.Queue() if stream else None
        self.cancelled = threading.Event()
        self.rows: list[_Row] = []
        self.session_rows: list = []  # the rows' handles in the running DecodeSession
        # characters a stream holds back so that a stop sequence is never half-sent
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.rows_left = 0
        self.finished = False
        self.version = ""

    @property
    def num_rows(self) -> int:
        return len(self.prompts) * self.sp.n

    # -- called from the worker thread -------------------------------------------------------

    def _call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def emit(self, event: StreamEvent) -> None:
        if self.queue is not None:
            self._call(self.queue.put_nowait, event)

    def resolve(self, result) -> None:
        self.finished = True
        self._call(_set_future, self.future, result, None)
        if self.queue is not None:
            self._call(self.queue.put_nowait, None)

    def fail(self, exc: BaseException) -> None:
        self.finished = True
        self._call(_set_future, self.future, None, exc)
        if self.queue is not None:
            self._call(self.queue.put_nowait, exc)


def _set_future(fut: asyncio.Future, result, exc) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class PolicyCore:
    """Serves one policy model version at a time, with dynamic batching."""

    def __init__(self, store, device: str, limits: PolicyLimits, metrics: ServiceMetrics, quantize: str = "none"):
        self.store = store
        self.device = device
        self.quantize = quantize
        self.limits = limits
        self.metrics = metrics
        self.current: LoadedPalm | None = None
        self._pending: deque[_Request] = deque()
        self._pending_lock = threading.Lock()  # the worker and close() both take from the queue
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="policy-generate")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="policy-load")
        self._load_lock: asyncio.Lock | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, path: Path, version: str) -> None:
        """Load the first model and start the batcher."""
        self._wakeup = asyncio.Event()
        self._load_lock = asyncio.Lock()
        loaded = await asyncio.get_running_loop().run_in_executor(
            self._loader, load_palm_version, path, version, self.device, self.quantize
        )
        self._swap(loaded)
        self._batcher = asyncio.create_task(self._batch_loop(), name="policy-batcher")

    async def close(self) -> None:
        self._closed = True
        if self._batcher is not None:
            self._batcher.cancel()
            try:
                await self._batcher
            except asyncio.CancelledError:
                pass  # the expected outcome of cancel()
        with self._pending_lock:  # the worker may be admitting from the same queue
            waiting = list(self._pending)
            self._pending.clear()
        for req in waiting:
            req.fail(Unavailable("the server is shutting down"))
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)

    def _swap(self, loaded: LoadedPalm) -> None:
        # Rebinding one attribute is atomic: a batch that already took the old object keeps it.
        self.current = loaded
        self.metrics.set_version(loaded.version)
        log.info("policy now serving %s (%s)", loaded.version, loaded.path)

    async def load_version(self, version: str | None) -> tuple[str, str]:
        """Switch to ``version`` (None/"" = the store's CURRENT); returns (new, previous)."""
        if self._load_lock is None or self.current is None:
            raise Unavailable("the policy model is still loading")
        async with self._load_lock:
            previous = self.current.version
            if not version:
                version = self.store.current()
                if version is None:
                    raise Unavailable(f"the policy store {self.store.root} has no versions")
            path = version_path(self.store, version)  # NotFound for unknown versions
            if version == previous:
                return version, previous
            loaded = await asyncio.get_running_loop().run_in_executor(
                self._loader, load_palm_version, path, version, self.device, self.quantize
            )
            self._swap(loaded)
            return version, previous

    # -- request validation ---------------------------------------------------------------

    def _model(self) -> LoadedPalm:
        if self.current is None:
            raise Unavailable("the policy model is still loading; retry shortly")
        return self.current

    def encode_prompts(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Token ids for each prompt: text is encoded with BOS prepended; ids are checked."""
        m = self._model()
        lim = self.limits
        if not prompts:
            raise InvalidArgument("no prompts given: send at least one prompt")
        if len(prompts) > lim.max_batch:
            raise ResourceExhausted(f"{len(prompts)} prompts in one request; the limit is {lim.max_batch}")
        vocab = m.model.num_tokens
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:
                    raise InvalidArgument(f"prompt {i} is empty text")
                ids = [m.tokenizer.bos_id] + list(m.tokenizer.encode(p))
            else:
                ids = [int(t) for t in p]
                if not ids:
                    raise InvalidArgument(f"prompt {i} has no token ids")
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise InvalidArgument(
                        f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
                    )
            if len(ids) > lim.max_prompt_tokens:
                raise ResourceExhausted(
                    f"prompt {i} has {len(ids)} tokens; the limit is {lim.max_prompt_tokens}"
                )
            out.append(ids)
        return out

    def sampling_params(self, params: GenParams, prompts: list[list[int]]) -> SamplingParams:
        m = self._model()
        lim = self.limits
        n = 1 if params.n is None else int(params.n)
        temperature = 1.0 if params.temperature is None else float(params.temperature)
        top_k = 0 if params.top_k is None else int(params.top_k)
        top_p = 1.0 if params.top_p is None else float(params.top_p)
        max_new = lim.default_max_new_tokens if params.max_new_tokens is None else int(params.max_new_tokens)
        if n < 1:
            raise InvalidArgument(f"n must be >= 1, got {n}")
        if n > lim.max_n:
            raise ResourceExhausted(f"n = {n} samples per prompt; the limit is {lim.max_n}")
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 disables), got {top_k}")
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
        if max_new < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1, got {max_new}")
        if max_new > lim.max_new_tokens:
            raise ResourceExhausted(f"max_new_tokens = {max_new}; the limit is {lim.max_new_tokens}")
        min_p = 0.0 if params.min_p is None else float(params.min_p)
        if not math.isfinite(min_p) or not 0 <= min_p <= 1:
            raise InvalidArgument(f"min_p must be in [0, 1], got {min_p}")
        penalties = {}
        for name, default in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            v = getattr(params, name)
            v = default if v is None else float(v)
            if not math.isfinite(v):
                raise InvalidArgument(f"{name} must be a finite number, got {v}")
            penalties[name] = v
        if penalties["repetition_penalty"] <= 0:
            raise InvalidArgument(f"repetition_penalty must be > 0, got {penalties['repetition_penalty']}")
        min_tokens = 0 if params.min_tokens is None else int(params.min_tokens)
        if not 0 <= min_tokens <= max_new:
            raise InvalidArgument(f"min_tokens must be in [0, max_new_tokens = {max_new}], got {min_tokens}")
        top_logprobs = int(params.top_logprobs or 0)
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        if any(s == "" for s in params.stop):
            raise InvalidArgument("stop sequences must be non-empty strings")
        vocab = m.model.num_tokens
        bad = [t for t in params.stop_token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise InvalidArgument(f"stop token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        bad = [t for t in params.logit_bias if not 0 <= int(t) < vocab]
        if bad:
            raise InvalidArgument(f"logit_bias token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        bad = [t for t, v in params.logit_bias.items() if not math.isfinite(v)]
        if bad:
            raise InvalidArgument(f"logit_bias values must be finite (token {bad[0]})")
        longest = max(len(p) for p in prompts)
        if longest + max_new > m.config.max_seq_len:
            raise ResourceExhausted(
                f"{longest} prompt tokens + {max_new} new tokens exceed the model's max_seq_len "
                f"of {m.config.max_seq_len}"
            )
        if n * len(prompts) > lim.max_batch_rows:
            raise ResourceExhausted(
                f"{len(prompts)} prompts x {n} samples = {n * len(prompts)} sequences; the limit is "
                f"{lim.max_batch_rows}"
            )
        eos = [] if params.ignore_eos else [m.tokenizer.eos_id]
        stop_ids = [*eos, *(int(t) for t in params.stop_token_ids)]
        return SamplingParams(
            max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
            stop_token_ids=tuple(dict.fromkeys(stop_ids)), seed=params.seed, n=n,
            min_p=min_p, **penalties, logit_bias={int(t): float(v) for t, v in params.logit_bias.items()} or None,
            min_tokens=min_tokens, top_logprobs=top_logprobs if params.return_logprobs else 0,
        )

    # -- public API -----------------------------------------------------------------------

    def _submit(self, prompts, params: GenParams, timeout: float | None, stream: bool) -> _Request:
        if self._closed:
            raise Unavailable("the server is shutting down")
        ids = self.encode_prompts(prompts)
        sp = self.sampling_params(params, ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        req = _Request(ids, sp, params, deadline, asyncio.get_running_loop(), stream)
        cap = self.limits.max_queue_rows
        if cap:
            with self._pending_lock:
                waiting = sum(r.num_rows for r in self._pending)
            if waiting and waiting + req.num_rows > cap:
                self.metrics.shed.labels(self.metrics.service).inc()
                raise Overloaded(
                    f"the policy is at capacity: {waiting} sequences are waiting (the limit is {cap}); "
                    "retry shortly"
                )
        self._pending.append(req)
        self.metrics.queue_depth.labels(self.metrics.service).set(len(self._pending))
        self._wakeup.set()
        return req

    async def generate(self, prompts: Sequence[str | Sequence[int]], params: GenParams,
                       timeout: float | None = None) -> GenerationOut:
        """Sample ``n`` candidates per prompt; ``timeout`` is the caller's remaining time."""
        req = self._submit(prompts, params, timeout, stream=False)
        try:
            return await asyncio.shield(req.future)
        except asyncio.CancelledError:
            req.cancelled.set()  # the caller went away: stop spending forward passes on it
            raise

    async def generate_stream(self, prompts: Sequence[str | Sequence[int]], params: GenParams,
                              timeout: float | None = None) -> AsyncIterator[StreamEvent]:
        """Yield token deltas as they are sampled, then one final event per candidate."""
        req = self._submit(prompts, params, timeout, stream=True)
        try:
            while True:
                item = await req.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancelled.set()

    # -- batching ---------------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.limits.batch_window_s > 0:
                # The model was idle: give requests sent together a moment to arrive together.
                await asyncio.sleep(self.limits.batch_window_s)
            model = self.current  # this batch, and every request that joins it, runs on this object
            await loop.run_in_executor(self._worker, self._run_batch, model)

    def _admit(self, session: DecodeSession, m: LoadedPalm) -> list[_Request]:
        """Worker thread: move queued requests into the running batch while they fit (in
        arrival order; all of them in one prefill), unless the served version changed: those
        wait for a batch of their own."""
        taken: list[_Request] = []
        if self._closed or self.current is not m:
            return taken
        prompts: list[list[int]] = []
        params: list[SamplingParams] = []
        rows = len(session)
        while True:
            with self._pending_lock:
                if not self._pending:
                    break
                req = self._pending[0]
                if req.cancelled.is_set():
                    self._pending.popleft()
                    continue
                if rows + req.num_rows > self.limits.max_batch_rows or not session.fits(
                    prompts + req.prompts, params + [req.sp] * len(req.prompts)
                ):
                    break
                self._pending.popleft()
            taken.append(req)
            prompts.extend(req.prompts)
            params.extend([req.sp] * len(req.prompts))
            rows += req.num_rows
        if not taken:
            return taken
        for req in taken:
            req.version = m.version
            req.rows = [_Row(req, pi, j) for pi in range(len(req.prompts)) for j in range(req.sp.n)]
            req.rows_left = req.num_rows
        try:
            srows = session.add(prompts, params)
        except Exception as e:  # the prefill failed: fail these requests, not the running batch
            log.exception("prefill of %d requests failed", len(taken))
            for req in taken:
                req.fail(e)
            return []
        # session rows come prompt by prompt, samples within a prompt: the requests' order
        at = 0
        for req in taken:
            req.session_rows = srows[at : at + req.num_rows]
            at += req.num_rows
            for srow, row in zip(req.session_rows, req.rows):
                srow.tag = row
        svc = self.metrics.service
        self.metrics.queue_depth.labels(svc).set(len(self._pending))
        self.metrics.prompt_tokens.labels(svc).inc(sum(len(p) for p in prompts))
        return taken

    def _run_batch(self, m: LoadedPalm) -> None:
        """Worker thread: decode the queued requests together, admitting newcomers between
        steps (continuous batching) and retiring rows as they finish."""
        lim = self.limits
        tok = m.tokenizer
        svc = self.metrics.service
        session = DecodeSession(m.model)
        active: list[_Request] = []
        threads = None
        generated = 0
        try:
            while True:
                joined = self._admit(session, m)
                if joined:
                    active.extend(joined)
                    self.metrics.batch_size.labels(svc).observe(len(active))
                    self.metrics.batch_rows.labels(svc).observe(len(session))
                if not session:
                    break
                if lim.batch_threads > 0:
                    import torch

                    want = lim.batch_threads if len(session) >= lim.batch_threads_min_rows else max(1, lim.base_threads)
                    if want != threads:  # set on change: a fresh worker thread does not report the process setting
                        torch.set_num_threads(want)
                        threads = want
                leaving = []
                for ev in session.step():
                    row: _Row = ev.row.tag
                    if row.done:
                        continue
                    finished = ev.finished
                    new_ids: list[int] = []
                    new_lps: list[float] = []
                    new_tops: list = []
                    if finished == "stop":
                        row.reason = "stop"  # the stop id itself is not part of the answer
                    else:
                        row.ids.append(ev.token)
                        row.lps.append(ev.logprob)
                        new_ids, new_lps = [ev.token], [ev.logprob]
                        if ev.top:
                            row.tops.append(ev.top)
                            new_tops = [ev.top]
                        generated += 1
                        if (row.req.params.stop and len(row.ids) >= row.req.sp.min_tokens
                                and self._match_stop(row, tok)):
                            finished = "stop"
                            if ev.finished is None:
                                leaving.append(ev.row)
                    req = row.req
                    if finished is not None:
                        row.done = True
                        if finished == "length":
                            row.reason = "length"
                        req.rows_left -= 1
                    if req.queue is not None:
                        self._emit(row, tok, new_ids, new_lps, finished, req.holdback, new_tops)
                    if req.rows_left == 0 and not req.finished:
                        self._complete(req, tok)
                now = time.monotonic()
                for req in active:
                    if not req.finished and (
                        req.cancelled.is_set() or (req.deadline is not None and now > req.deadline - DEADLINE_MARGIN_S)
                    ):
                        self._cut_short(req, m)
                        leaving.extend(r for r in req.session_rows if r.finish_reason is None)
                if leaving:
                    session.remove(leaving)
                active = [req for req in active if not req.finished]
        except Exception as e:
            log.exception("a batch of %d requests failed", len(active))
            for req in active:
                if not req.finished:
                    req.fail(e)
        finally:
            self.metrics.tokens_generated.labels(svc).inc(generated)
        for req in active:
            if not req.finished:  # cannot happen: every row ends with a finish reason
                self._complete(req, tok)

    @staticmethod
    def _match_stop(row: _Row, tok) -> bool:
        """True when the row's text now contains one of its stop sequences (then truncated)."""
        text = tok.decode(row.ids)
        found = scan_stops(text, row.req.params.stop)
        if not found.stopped:
            return False
        cut, stop = found.end, found.matched
        keep = len(row.ids)
        while keep > 0 and len(tok.decode(row.ids[:keep])) > cut:
            keep -= 1
        del row.ids[keep:], row.lps[keep:], row.tops[keep:]
        row.matched, row.reason = stop, "stop"
        return True

    @staticmethod
    def _alternatives(tok, tops: list[list[tuple[int, float]]]) -> list[list[Alternative]]:
        return [[(t, lp, token_bytes(tok, t)) for t, lp in top] for top in tops]

    @staticmethod
    def _emit(row: _Row, tok, ids: list[int], lps: list[float], finished: str | None, holdback: int,
              tops: list | None = None) -> None:
        req = row.req
        want = req.params.return_logprobs
        text = tok.decode(row.ids)
        if finished is None:
            stable = text.rstrip("\ufffd")  # an incomplete multi-byte character decodes as U+FFFD
            if holdback:  # never half-send a stop sequence: hold back what could begin one
                stable = stable[: max(len(row.emitted), scan_stops(stable, req.params.stop).safe)]
        else:
            stable = text
        delta = stable[len(row.emitted):] if stable.startswith(row.emitted) else ""
        row.emitted += delta
        req.emit(StreamEvent(
            prompt_index=row.prompt_index, sample_index=row.sample_index, token_ids=ids,
            logprobs=lps if want else [], text=delta,
            finish_reason=row.reason if finished is not None else None, version=req.version,
            prompt_token_ids=req.prompts[row.prompt_index] if row.sample_index == 0 and not row.announced else [],
            token_bytes=[token_bytes(tok, t) for t in ids] if want else [],
            top_logprobs=PolicyCore._alternatives(tok, tops or []) if want else [],
        ))
        row.announced = True

    def _complete(self, req: _Request, tok) -> None:
        n = req.sp.n
        cands = [[None] * n for _ in req.prompts]
        for row in req.rows:
            want = req.params.return_logprobs
            cands[row.prompt_index][row.sample_index] = CandidateOut(
                token_ids=list(row.ids), logprobs=list(row.lps) if want else [],
                text=tok.decode(row.ids), finish_reason=row.reason, matched_stop=row.matched,
                token_bytes=[token_bytes(tok, t) for t in row.ids] if want else [],
                top_logprobs=self._alternatives(tok, row.tops) if want else [],
            )
        req.resolve(GenerationOut(prompt_token_ids=req.prompts, candidates=cands, version=req.version))

    def _cut_short(self, req: _Request, m: LoadedPalm) -> None:
        """Stop a request whose caller left or whose deadline is about to pass."""
        if req.finished:
            return
        if req.queue is None:
            req.fail(DeadlineExceeded("deadline exceeded before generation finished")
                     if not req.cancelled.is_set() else Unavailable("cancelled"))
            for row in req.rows:
                row.done = True
            return
        for row in req.rows:
            if not row.done:
                row.done, row.reason = True, "cancelled"
                self._emit(row, m.tokenizer, [], [], "cancelled", 0)
        req.resolve(None)
