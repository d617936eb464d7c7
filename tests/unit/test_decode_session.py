"""DecodeSession: continuous batching. Rows that join a running batch between steps, or leave
it early, must sample exactly what they would sample alone."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf import DecodeSession, GenerationError, PaLM, SamplingParams, generate_tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # float64: batched and single-row matmuls agree to ~1e-15, so even sampled tokens match
    return PaLM(num_tokens=64, dim=32, depth=2, heads=2, dim_head=16).double().eval()


def alone(model, prompt, sp):
    return [c.token_ids for c in generate_tokens(model, [prompt], sp)[0]]


def run_schedule(session, schedule, until_empty=True):
    """schedule: {step: [(tag, prompt, params)]}; returns {(tag, sample): tokens}, {(tag, sample): reason}."""
    out, reasons, step = {}, {}, 0
    while session or any(s >= step for s in schedule):
        for tag, prompt, sp in schedule.get(step, []):
            session.add([prompt], sp, tag=tag)
        for ev in session.step():
            out.setdefault((ev.row.tag, ev.row.sample_index), []).append(ev.token)
            if ev.finished:
                reasons[(ev.row.tag, ev.row.sample_index)] = ev.finished
        step += 1
    return out, reasons


def test_rows_joining_mid_run_sample_what_they_sample_alone(model):
    reqs = {
        "greedy": ([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=12, temperature=0)),
        "pair": ([7, 8], SamplingParams(max_new_tokens=7, temperature=0, n=2)),
        # longer than the running batch's clock when it joins: every earlier row moves right
        "long": (list(range(10, 30)), SamplingParams(max_new_tokens=9, temperature=1.0, seed=5, n=3)),
        "topk": ([3], SamplingParams(max_new_tokens=15, temperature=0.7, seed=1, top_k=5)),
    }
    schedule = {0: [("greedy", *reqs["greedy"])], 1: [("pair", *reqs["pair"])],
                3: [("long", *reqs["long"])], 5: [("topk", *reqs["topk"])]}
    session = DecodeSession(model)
    out, reasons = run_schedule(session, schedule)
    for tag, (prompt, sp) in reqs.items():
        for j, want in enumerate(alone(model, prompt, sp)):
            assert out[(tag, j)] == want, (tag, j)
            assert reasons[(tag, j)] == "length"
    assert not session and session.slots == 0


def test_stop_ids_end_a_row_and_its_neighbours_go_on(model):
    prompt = [4, 9, 2]
    free = alone(model, prompt, SamplingParams(max_new_tokens=10, temperature=0))[0]
    stop = free[3]  # the 4th greedy token: the row must end there, the stop id included
    first = free.index(stop)
    session = DecodeSession(model)
    out, reasons = run_schedule(session, {
        0: [("stops", prompt, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=(stop,))),
            ("free", prompt, SamplingParams(max_new_tokens=10, temperature=0))],
    })
    assert out[("stops", 0)] == free[: first + 1] and reasons[("stops", 0)] == "stop"
    assert out[("free", 0)] == free and reasons[("free", 0)] == "length"


def test_removed_rows_leave_and_the_rest_are_unaffected(model):
    sp_keep = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11, n=2)
    session = DecodeSession(model)
    doomed = session.add([[5, 6, 7, 8]], SamplingParams(max_new_tokens=10, temperature=0, n=3), tag="doomed")
    session.add([[9, 1]], sp_keep, tag="keep")
    got, seen_after = {}, 0
    for step in range(10):
        if step == 2:
            session.remove(doomed[:2])
            assert len(session) == 3
        for ev in session.step():
            got.setdefault((ev.row.tag, ev.row.sample_index), []).append(ev.token)
            if step >= 2 and ev.row in doomed[:2]:
                seen_after += 1
    assert seen_after == 0, "removed rows must not sample again"
    assert all(r.finish_reason == "removed" for r in doomed[:2])
    assert [got[("keep", j)] for j in range(2)] == alone(model, [9, 1], sp_keep)
    assert got[("doomed", 2)] == alone(model, [5, 6, 7, 8], SamplingParams(max_new_tokens=10, temperature=0))[0]
    assert not session


def test_leading_slots_are_reclaimed_over_a_long_run(model):
    """A server's batch may never empty: the cache must not grow with the total run time."""
    session = DecodeSession(model)
    sp = SamplingParams(max_new_tokens=6, temperature=0)
    widest = 0
    for step in range(200):
        if step % 3 == 0:
            session.add([[1 + step % 50, 2, 3]], sp, tag=step)
        session.step()
        widest = max(widest, session.slots)
    assert len(session) > 0
    # live rows span at most 3 + 6 slots and need 6 more; the cache keeps 2x headroom
    assert widest <= 2 * (3 + 6 + 6), f"the cache grew to {widest} slots"


def test_fits_and_add_refuse_what_the_cache_cannot_hold(model):
    session = DecodeSession(model, max_slots=24)
    session.add([list(range(1, 11))], SamplingParams(max_new_tokens=10, temperature=0))
    session.step()
    big = [list(range(1, 21))]
    assert not session.fits(big, SamplingParams(max_new_tokens=10))
    with pytest.raises(GenerationError, match="no room"):
        session.add(big, SamplingParams(max_new_tokens=10))
    assert session.fits([[1, 2]], SamplingParams(max_new_tokens=4))
    while session:
        session.step()
    assert session.fits(big, SamplingParams(max_new_tokens=4))


def test_bad_input_is_refused_before_touching_the_batch(model):
    session = DecodeSession(model)
    session.add([[1, 2]], SamplingParams(max_new_tokens=3, temperature=0))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        session.add([[1, 999]], SamplingParams())
    with pytest.raises(GenerationError, match="empty"):
        session.add([[]], SamplingParams())
    assert len(session) == 1
