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
import json
import logging
import math
import os
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


STATUS_FILE = "status.json"
OUTCOMES = ("published", "rejected", "nothing to learn", "waiting", "failed")


def no_update(core: TrainerCore) -> tuple[str | None, dict[str, Any]]:
    """The default update round: nothing to learn from yet."""
    return None, {"message": "no new feedback", "outcome": "nothing to learn"}


@dataclass
class RoundSchedule:
    """When rounds start by themselves: as soon as ``after_feedback`` feedback rows are new, or
    ``after_seconds`` after the last round (or the trainer's start) once any row is new,
    whichever comes first. 0 turns a trigger off; both 0 leaves only the manual Trigger. The
    count comes from the update callable's ``pending_feedback()`` (the online loop's read of
    the feedback log); an update callable without one is never started automatically."""

    after_feedback: int = 64
    after_seconds: float = 90.0
    poll: float = 5.0

    @property
    def enabled(self) -> bool:
        return self.after_feedback > 0 or self.after_seconds > 0


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
    outcome: str = ""


def _split_metrics(raw: dict[str, Any]) -> tuple[dict[str, float], str, str]:
    """Numeric metrics (bools as 0/1), the round's message and its outcome (the "message" and
    "outcome" keys, if any)."""
    numeric: dict[str, float] = {}
    message = outcome = ""
    for k, v in (raw or {}).items():
        if k == "message":
            message = str(v)
        elif k == "outcome":
            outcome = str(v)
        elif isinstance(v, (bool, int, float)):
            numeric[str(k)] = float(v)
        elif hasattr(v, "item"):  # a 0-d tensor or numpy scalar
            try:
                numeric[str(k)] = float(v.item())
            except (TypeError, ValueError):
                pass
    return numeric, message, outcome


class TrainerCore:
    def __init__(self, data_dir: str | Path, update_fn: UpdateFn | None = None,
                 metrics: ServiceMetrics | None = None, schedule: RoundSchedule | None = None):
        self.data_dir = Path(data_dir)
        self.policy_store: CheckpointStore = store(data_dir, "policy")
        self.reward_store: CheckpointStore = store(data_dir, "reward")
        self.update_fn: UpdateFn = update_fn or no_update
        self.metrics = metrics or ServiceMetrics("trainer")
        self.schedule = schedule or RoundSchedule(0, 0.0)
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self.last_message = ""
        self.last_outcome = ""
        self.last_update_unix = 0.0
        self.busy = False
        self._status_path = self.data_dir / "trainer" / STATUS_FILE
        self._load_status()
        self._clock_origin = time.time()  # the time trigger counts from here until a round ran
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

    def _load_status(self) -> None:
        """Step and last round from ``DATA_DIR/trainer/status.json`` (a restart keeps counting)."""
        try:
            raw = json.loads(self._status_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", self._status_path, e)
            return
        self.step = int(raw.get("step", 0))
        self.last_metrics = {str(k): float(v) for k, v in (raw.get("last_metrics") or {}).items()
                             if isinstance(v, (int, float))}
        self.last_message = str(raw.get("last_message", ""))
        self.last_outcome = str(raw.get("last_outcome", ""))
        self.last_update_unix = float(raw.get("last_update_unix", 0.0))

    def _save_status(self) -> None:
        self._status_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._status_path.with_name(f".{STATUS_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({
            "step": self.step, "last_metrics": {k: v for k, v in self.last_metrics.items() if math.isfinite(v)},
            "last_message": self.last_message, "last_outcome": self.last_outcome,
            "last_update_unix": self.last_update_unix,
        }, indent=1))
        os.replace(tmp, self._status_path)

    def pending_feedback(self) -> int | None:
        """New feedback rows the next round would read (None when the update callable cannot
        tell)."""
        fn = getattr(self.update_fn, "pending_feedback", None)
        if fn is None:
            return None
        try:
            return int(fn())
        except Exception as e:  # noqa: BLE001 -- a database hiccup must not stop the trainer
            log.warning("counting new feedback failed: %s", e)
            return None

    def _time_due(self) -> float:
        """Unix time at which the time trigger fires (given pending feedback); 0 if off."""
        if self.schedule.after_seconds <= 0:
            return 0.0
        return max(self.last_update_unix, self._clock_origin) + self.schedule.after_seconds

    def next_round(self, pending: int | None) -> tuple[str, float]:
        """(description, unix time) of what starts the next round by itself."""
        sch = self.schedule
        if not sch.enabled or not hasattr(self.update_fn, "pending_feedback"):
            return "manual trigger only", 0.0
        if self.busy:
            return "a round is running", 0.0
        parts = []
        so_far = "?" if pending is None else str(pending)
        if sch.after_feedback > 0:
            parts.append(f"at {sch.after_feedback} new feedback rows ({so_far} so far)")
        due = self._time_due()
        if due:
            when = time.strftime("%H:%M:%S UTC", time.gmtime(due))
            parts.append(f"at {when} if any feedback is new" if not pending else f"at {when}")
        return " or ".join(parts), (due if pending else 0.0)

    def status(self) -> dict[str, Any]:
        pending = self.pending_feedback()
        next_round, next_unix = self.next_round(pending)
        return {
            "step": self.step,
            "policy_version": self.policy_store.current() or "",
            "reward_version": self.reward_store.current() or "",
            "last_metrics": dict(self.last_metrics),
            "last_message": self.last_message,
            "busy": self.busy,
            "last_update_unix": self.last_update_unix,
            "policy_versions": self.policy_store.versions(),
            "pending_feedback": -1 if pending is None else pending,
            "next_round": next_round,
            "next_round_unix": next_unix,
            "last_outcome": self.last_outcome,
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
                self.last_outcome = "failed"
                self.last_update_unix = time.time()
                await asyncio.to_thread(self._save_status)
                raise
            finally:
                self.busy = False
                self.last_update_unix = time.time()
            numeric, message, outcome = _split_metrics(raw)
            self.step += 1
            self.metrics.trainer_steps.labels(self.metrics.service).inc()
            self.last_metrics = numeric
            self.last_message = message or (f"published {version}" if version else "no new version")
            self.last_outcome = "published" if version else (outcome or "nothing to learn")
            await asyncio.to_thread(self._save_status)
            if version:
                version_path(self.policy_store, version)  # the round must have saved what it returns
                self.announce(version, "publish")
            log.info("round %d: %s: %s", self.step, self.last_outcome, self.last_message)
            return RoundResult(bool(version), self.policy_store.current() or "", numeric, self.last_message,
                               self.step, self.last_outcome)

    async def run_periodically(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._round_logged()

    async def run_scheduled(self) -> None:
        """Start rounds by themselves as :class:`RoundSchedule` says (see there)."""
        sch = self.schedule
        if not sch.enabled or not hasattr(self.update_fn, "pending_feedback"):
            return
        log.info("automatic rounds: at %s new feedback rows or %ss after the last round with new feedback",
                 sch.after_feedback or "(off)", sch.after_seconds or "(off)")
        while not self._closed:
            await asyncio.sleep(sch.poll)
            if self._round_lock.locked():
                continue
            pending = await asyncio.to_thread(self.pending_feedback)
            if not pending:
                continue
            by_count = sch.after_feedback > 0 and pending >= sch.after_feedback
            due = self._time_due()
            by_time = bool(due) and time.time() >= due
            if by_count or by_time:
                log.info("starting a round: %d new feedback rows (%s)", pending,
                         "count reached" if by_count else "time reached")
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
