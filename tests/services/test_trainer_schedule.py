"""Rounds that start by themselves: on a count of new feedback rows or after a time with any
new row; the step and the last outcome survive a restart."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.trainer.core import RoundSchedule, TrainerCore

from .conftest import make_data_dir


class CountingUpdate:
    """An update callable with a feedback counter the test sets; a round reads everything."""

    def __init__(self, outcome: str = "rejected"):
        self.pending = 0
        self.rounds: list[int] = []
        self.outcome = outcome

    def pending_feedback(self) -> int:
        return self.pending

    def __call__(self, core):
        self.rounds.append(self.pending)
        self.pending = 0
        return None, {"message": f"{self.outcome}: figures", "outcome": self.outcome, "gain": 0.5}


async def _wait(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_round_starts_when_enough_feedback_is_new(tmp_path):
    async def main():
        upd = CountingUpdate()
        core = TrainerCore(make_data_dir(tmp_path), upd, schedule=RoundSchedule(5, 0.0, poll=0.02))
        await core.start()
        task = asyncio.create_task(core.run_scheduled())
        upd.pending = 4
        await asyncio.sleep(0.3)
        assert upd.rounds == [] and core.step == 0  # below the count, no time trigger
        assert core.status()["next_round"] == "at 5 new feedback rows (4 so far)"
        upd.pending = 5
        await _wait(lambda: core.step == 1)
        assert upd.rounds == [5]
        s = core.status()
        assert s["last_outcome"] == "rejected" and s["pending_feedback"] == 0 and s["last_message"].startswith("rej")
        task.cancel()

    asyncio.run(main())


def test_a_round_starts_after_the_time_once_any_feedback_is_new(tmp_path):
    async def main():
        upd = CountingUpdate()
        core = TrainerCore(make_data_dir(tmp_path), upd, schedule=RoundSchedule(1000, 0.5, poll=0.02))
        await core.start()
        task = asyncio.create_task(core.run_scheduled())
        await asyncio.sleep(0.8)
        assert core.step == 0  # time passed, but nothing is new: no round
        upd.pending = 1
        t0 = time.monotonic()
        await _wait(lambda: core.step == 1)
        assert time.monotonic() - t0 < 0.5  # due already: it starts at the next poll
        upd.pending = 2
        s = core.status()
        assert s["next_round_unix"] == pytest.approx(core.last_update_unix + 0.5)
        t1 = time.monotonic()
        await _wait(lambda: core.step == 2)
        assert time.monotonic() - t1 >= 0.35  # the time counts from the last round
        assert upd.rounds == [1, 2]
        task.cancel()

    asyncio.run(main())


def test_without_a_feedback_count_or_with_the_schedule_off_only_trigger_runs_rounds(tmp_path):
    async def main():
        data = make_data_dir(tmp_path)
        upd = CountingUpdate()
        off = TrainerCore(data, upd, schedule=RoundSchedule(0, 0.0, poll=0.02))
        await off.start()
        upd.pending = 100
        await asyncio.wait_for(off.run_scheduled(), 1)  # returns at once: nothing to schedule
        assert off.step == 0 and off.status()["next_round"] == "manual trigger only"
        r = await off.trigger(wait=True)
        assert r.step == 1 and r.outcome == "rejected"

    asyncio.run(main())


def test_the_step_and_the_last_outcome_survive_a_restart(tmp_path):
    async def main():
        data = make_data_dir(tmp_path)
        core = TrainerCore(data, CountingUpdate("nothing to learn"))
        await core.start()
        await core.trigger(wait=True)
        await core.trigger(wait=True)
        again = TrainerCore(data, CountingUpdate())
        await again.start()
        s = again.status()
        assert s["step"] == 2 and s["last_outcome"] == "nothing to learn" and s["last_metrics"] == {"gain": 0.5}
        assert s["last_update_unix"] == pytest.approx(core.last_update_unix)
        r = await again.trigger(wait=True)
        assert r.step == 3

    asyncio.run(main())


def test_a_failed_round_is_recorded_as_failed(tmp_path):
    def broken(core):
        raise RuntimeError("disk full")

    async def main():
        core = TrainerCore(make_data_dir(tmp_path), broken)
        await core.start()
        with pytest.raises(RuntimeError):
            await core.trigger(wait=True)
        assert core.status()["last_outcome"] == "failed" and "disk full" in core.last_message

    asyncio.run(main())
