"""The trainer core: update rounds, publishing, rollback and version announcements.

The learning itself is a pluggable ``update_fn(core) -> (new_policy_version | None, metrics)``
that runs one round in a worker thread; it publishes a new policy with :meth:`TrainerCore.publish`
(or saves to the store and returns the version). Publishing is CheckpointStore.save plus an
announcement to every WatchVersions subscriber; rollback is CheckpointStore.rollback plus an
announcement. Changes made to the store's CURRENT pointer by other tools are noticed by
:meth:`TrainerCore.poll_store` and announced too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palm_rlhf.checkpoint import CheckpointStore
from services.common.errors import FailedPrecondition
from services.common.metrics import ServiceMetrics
from services.common.models import store, version_path

log = logging.getLogger(__name__)

UpdateFn = Callable[["TrainerCore"], tuple[str | None, dict[str, Any]]]


def no_update(core: TrainerCore) -> tuple[str | None, dict[str, Any]]:
    """The default update round: nothing to learn from yet."""
    return None, {"message": "no new feedback"}


@dataclass
class Announcement:
    kind: str
    version: str
    previous: str
    reason: str  # "publish" | "rollback" | "current" | "store"
    timestamp: float = field(default_factory=time.time)


@dataclass
class RoundResult:
    published: bool
    policy_version: str
    metrics: dict[str, float]
    message: str
    step: int


def _split_metrics(raw: dict[str, Any]) -> tuple[dict[str, float], str]:
    """Numeric metrics (bools as 0/1) and the round's message (the "message" key, if any)."""
    numeric: dict[str, float] = {}
    message = ""
    for k, v in (raw or {}).items():
        if k == "message":
            message = str(v)
        elif isinstance(v, (bool, int, float)):
            numeric[str(k)] = float(v)
        elif hasattr(v, "item"):  # a 0-d tensor or numpy scalar
            try:
                numeric[str(k)] = float(v.item())
            except (TypeError, ValueError):
                pass
    return numeric, message


class TrainerCore:
    def __init__(self, data_dir: str | Path, update_fn: UpdateFn | None = None,
                 metrics: ServiceMetrics | None = None):
        self.data_dir = Path(data_dir)
        self.policy_store: CheckpointStore = store(data_dir, "policy")
        self.reward_store: CheckpointStore = store(data_dir, "reward")
        self.update_fn: UpdateFn = update_fn or no_update
        self.metrics = metrics or ServiceMetrics("trainer")
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self.last_message = ""
        self.last_update_unix = 0.0
        self.busy = False
        self._round_lock = asyncio.Lock()
        self._store_lock = asyncio.Lock()  # rollback vs. the store poller: one announces, as "rollback"
        self._watchers: set[asyncio.Queue] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._announced: str | None = None
        self._closed = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._announced = await asyncio.to_thread(self.policy_store.current)
        if self._announced:
            self.metrics.set_version(self._announced)

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "policy_version": self.policy_store.current() or "",
            "reward_version": self.reward_store.current() or "",
            "last_metrics": dict(self.last_metrics),
            "last_message": self.last_message,
            "busy": self.busy,
            "last_update_unix": self.last_update_unix,
            "policy_versions": self.policy_store.versions(),
        }

    # -- update rounds ----------------------------------------------------------------------

    async def trigger(self, wait: bool = True) -> RoundResult:
        """Run one update round now (``wait=False``: start it and return at once)."""
        if self._round_lock.locked():
            return RoundResult(False, self.policy_store.current() or "", {}, "an update round is already running",
                               self.step)
        if not wait:
            asyncio.create_task(self._round_logged())
            await asyncio.sleep(0)  # let the round take the lock before the caller can trigger again
            return RoundResult(False, self.policy_store.current() or "", {}, "started", self.step)
        return await self._round()

    async def _round_logged(self) -> None:
        try:
            await self._round()
        except Exception:
            log.exception("update round failed")

    async def _round(self) -> RoundResult:
        async with self._round_lock:
            self.busy = True
            try:
                version, raw = await asyncio.to_thread(self.update_fn, self)
            except Exception as e:
                self.last_message = f"update failed: {type(e).__name__}: {e}"
                raise
            finally:
                self.busy = False
                self.last_update_unix = time.time()
            numeric, message = _split_metrics(raw)
            self.step += 1
            self.metrics.trainer_steps.labels(self.metrics.service).inc()
            self.last_metrics = numeric
            self.last_message = message or (f"published {version}" if version else "no new version")
            if version:
                version_path(self.policy_store, version)  # the round must have saved what it returns
                self.announce(version, "publish")
            return RoundResult(bool(version), self.policy_store.current() or "", numeric, self.last_message,
                               self.step)

    async def run_periodically(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._round_logged()

    # -- versions ---------------------------------------------------------------------------

    def publish(self, model_or_state, config, *, parent: str | None = None, **kw) -> str:
        """Save a new policy version as CURRENT and announce it (callable from any thread)."""
        if parent is None:
            parent = self.policy_store.current()
        version = self.policy_store.save(model_or_state, config, parent=parent, **kw)
        self.announce(version, "publish")
        return version

    async def rollback(self, to: str | None = None) -> tuple[str, str]:
        """Point CURRENT at ``to`` (default: the parent of the current version) and announce."""
        async with self._store_lock:
            return await self._rollback(to)

    async def _rollback(self, to: str | None) -> tuple[str, str]:
        previous = self.policy_store.current()
        if to:
            version_path(self.policy_store, to)  # NotFound for unknown versions
        else:
            if previous is None:
                raise FailedPrecondition("nothing to roll back: the policy store is empty")
            to = self.policy_store.manifest(previous).get("parent")
            if not to:
                raise FailedPrecondition(f"version {previous} has no parent to roll back to")
        await asyncio.to_thread(self.policy_store.rollback, to)
        self.announce(to, "rollback", previous=previous)
        return to, previous or ""

    def announce(self, version: str, reason: str, previous: str | None = None) -> None:
        """Tell every watcher that ``version`` is now the policy to serve (thread-safe)."""
        if self._loop is None:
            raise RuntimeError("TrainerCore.start() has not run")
        ann = Announcement("policy", version, previous if previous is not None else (self._announced or ""), reason)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._broadcast(ann)
        else:
            self._loop.call_soon_threadsafe(self._broadcast, ann)

    def _broadcast(self, ann: Announcement) -> None:
        if ann.version == self._announced and ann.reason == "publish":
            return  # already announced (publish() then the round's return value)
        self._announced = ann.version
        self.metrics.set_version(ann.version)
        log.info("announcing policy %s (%s) to %d watchers", ann.version, ann.reason, len(self._watchers))
        for q in self._watchers:
            q.put_nowait(ann)

    async def watch(self, send_current: bool = True) -> AsyncIterator[Announcement]:
        """Announcements until the trainer shuts down or the caller stops iterating."""
        q: asyncio.Queue = asyncio.Queue()
        self._watchers.add(q)
        self.metrics.watchers.labels(self.metrics.service).set(len(self._watchers))
        try:
            if send_current and self._announced:
                yield Announcement("policy", self._announced, "", "current")
            while not self._closed:
                ann = await q.get()
                if ann is None:
                    return
                yield ann
        finally:
            self._watchers.discard(q)
            self.metrics.watchers.labels(self.metrics.service).set(len(self._watchers))

    async def poll_store(self, interval: float) -> None:
        """Announce CURRENT changes made outside this process (CLI rollback, another trainer)."""
        while True:
            await asyncio.sleep(interval)
            if self._round_lock.locked():
                continue  # a round may be publishing: it announces its own version
            async with self._store_lock:
                try:
                    current = await asyncio.to_thread(self.policy_store.current)
                except Exception:
                    log.exception("reading the policy store failed")
                    continue
                if current and current != self._announced and not self._round_lock.locked():
                    self._broadcast(Announcement("policy", current, self._announced or "", "store"))

    def close(self) -> None:
        """End every watch stream (used when draining)."""
        self._closed = True
        for q in self._watchers:
            q.put_nowait(None)
