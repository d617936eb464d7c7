"""The streaming state machine (services/gateway/streaming.py), without HTTP: events in, SSE
frames out."""

from __future__ import annotations

import json

from services.gateway.backends import StreamEvent
from services.gateway.schemas import AssistantMessage, ChatCompletionResponse, Choice, Usage
from services.gateway.streaming import LiveStream, ranked_events


def ev(i: int, text: str, finish: str | None = None, first: bool = False) -> StreamEvent:
    ids = [b + 4 for b in text.encode()]
    return StreamEvent(i, text, ids, [-0.5] * len(ids), finish, "v0001", [1, 2, 3] if first else [])


def frames(out: list[str]) -> list[dict | str]:
    got = []
    for f in out:
        assert f.startswith("data: ") and f.endswith("\n\n")
        data = f[len("data: ") : -2]
        got.append(data if data == "[DONE]" else json.loads(data))
    return got


def contents(out: list[str]) -> list[tuple[int, str]]:
    return [(c["index"], c["delta"]["content"]) for f in frames(out) for c in f["choices"] if c["delta"].get("content")]


def test_start_opens_every_choice_with_the_extras():
    live = LiveStream("chatcmpl-x", 7, "palm-rlhf", 2, [], {"palm_rlhf": {"dropped_turns": 4}})
    got = frames(live.start())
    assert [f["choices"][0]["index"] for f in got] == [0, 1]
    assert all(f["choices"][0]["delta"] == {"role": "assistant", "content": ""} for f in got)
    assert all(f["id"] == "chatcmpl-x" and f["object"] == "chat.completion.chunk" for f in got)
    assert all(f["palm_rlhf"] == {"dropped_turns": 4} for f in got)


def test_a_stop_string_split_across_events_is_never_sent():
    live = LiveStream("c", 0, "m", 1, ["STOP"])
    out = []
    for piece in [" It is ", "sunny ST", "O", "P and more"]:
        out += live.feed(ev(0, piece))
    assert contents(out) == [(0, "It is"), (0, " sunny")]
    assert live.texts == ["It is sunny"]
    # events after the end add nothing
    assert live.feed(ev(0, " tail", "stop")) == []
    assert live.texts == ["It is sunny"]


def test_a_held_back_prefix_is_sent_once_it_is_ruled_out():
    live = LiveStream("c", 0, "m", 1, ["END"])
    assert contents(live.feed(ev(0, " go E"))) == [(0, "go")]
    assert contents(live.feed(ev(0, "ast"))) == [(0, " East")]
    assert contents(live.feed(ev(0, " wind", "length"))) == [(0, " wind")]
    assert live.texts == ["go East wind"]


def test_newlines_end_the_answer_and_controls_and_spaces_never_reach_the_client():
    live = LiveStream("c", 0, "m", 2, [])
    out = live.feed(ev(0, "  hel\x07lo  "))
    out += live.feed(ev(1, " yes"))
    out += live.feed(ev(0, " there\nUser: more"))
    out += live.feed(ev(1, " indeed  ", "stop"))
    assert contents(out) == [(0, "hello"), (1, "yes"), (0, "   there"), (1, " indeed")]
    assert live.texts == ["hello   there", "yes indeed"]
    # what was sent per choice is exactly its answer
    sent = {0: "", 1: ""}
    for i, text in contents(out):
        sent[i] += text
    assert [sent[0], sent[1]] == live.texts


def test_finish_reports_reason_reward_rank_usage_and_done():
    live = LiveStream("c", 0, "m", 2, [])
    live.feed(ev(0, " a b", "length", first=True))
    live.feed(ev(1, " c", "stop"))
    gen = live.generation()
    assert gen.prompt_token_ids == [1, 2, 3] and gen.policy_version == "v0001"
    assert [c.finish_reason for c in gen.candidates] == ["length", "stop"]
    assert gen.completion_tokens == 6
    usage = {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    got = frames(live.finish_events([0.5, None], [1, 0], {"policy_version": "v1", "reward_version": "r1"}, usage))
    assert got[-1] == "[DONE]"
    last = [f["choices"][0] for f in got[:2]]
    assert [(c["index"], c["finish_reason"], c["reward"], c["rank"]) for c in last] == [
        (0, "length", 0.5, 1),
        (1, "stop", None, 0),
    ]
    assert got[2]["choices"] == [] and got[2]["usage"] == usage
    assert len(frames(live.finish_events([0.0, 0.0], [0, 1], {}, None))) == 3  # no usage chunk


def test_a_candidate_without_a_last_event_counts_as_cut_for_length():
    live = LiveStream("c", 0, "m", 1, [])
    live.feed(ev(0, " unfinished"))
    assert live.generation().candidates[0].finish_reason == "length"


def test_ranked_events_send_each_chosen_answer_whole():
    resp = ChatCompletionResponse(
        id="chatcmpl-r",
        created=5,
        model="palm-rlhf",
        choices=[
            Choice(index=0, message=AssistantMessage(content="best"), finish_reason="length", reward=2.0),
            Choice(index=1, message=AssistantMessage(content=""), finish_reason="stop", reward=1.0),
        ],
        usage=Usage(prompt_tokens=3, completion_tokens=9, total_tokens=12),
        policy_version="p1",
        reward_version="r1",
        best_of=4,
    )
    got = frames(list(ranked_events(resp, True, {"palm_rlhf": {"dropped_turns": 0}})))
    assert got[-1] == "[DONE]" and got[-2]["usage"]["total_tokens"] == 12
    choices = [f["choices"][0] for f in got[:-2]]
    assert [(c["index"], c["delta"].get("content"), c["finish_reason"]) for c in choices] == [
        (0, "", None),
        (0, "best", None),
        (0, None, "length"),
        (1, "", None),
        (1, None, "stop"),
    ]
    assert got[0]["palm_rlhf"] == {"dropped_turns": 0} and "palm_rlhf" not in got[1]
