"""The OpenAI API's log-probs, sampling controls, legacy completions, model versions and the
keys of streamed choices, through the official ``openai`` client: over the honest in-memory
backends (what reaches the policy, the shapes, the log), and end to end through the real
policy service (the effects)."""

from __future__ import annotations

import httpx
import openai
import pytest

from services.common.feedback_store import open_store
from services.gateway.app import GatewayConfig, create_app
from services.gateway.backends import GrpcBackends, SamplingOptions

from .conftest import E2E_KEY, RecordingBackends, ThreadServer

MESSAGES = [{"role": "user", "content": "How was your day?"}]
KEY = "sk-test"


@pytest.fixture
def backends() -> RecordingBackends:
    return RecordingBackends()


@pytest.fixture
def server(backends, sqlite_store):
    app = create_app(backends, sqlite_store, GatewayConfig(api_keys=[KEY]))
    with ThreadServer(app) as srv:
        yield srv


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def expected_content(cand, top_n):
    """The logprobs content the gateway must report for a stored (fake, byte-token) candidate."""
    out = []
    for t, lp in zip(cand.token_ids, cand.logprobs):
        alts = [t] + [4 + (t - 4 + k) % 256 for k in range(1, top_n)]
        out.append((chr(t - 4), lp, [t - 4], [(bytes([a - 4]).decode("utf-8", "backslashreplace"), [a - 4]) for a in alts]))
    return out


def content_of(items):
    return [(c.token, c.logprob, c.bytes, [(a.token, a.bytes) for a in c.top_logprobs]) for c in items]


# --------------------------------------------------------------------------------------------
# log-probs in chat completions


def test_chat_logprobs_with_top_alternatives(client, backends, sqlite_store):
    resp = client.chat.completions.create(
        model="palm-rlhf", messages=MESSAGES, seed=5, n=2, logprobs=True, top_logprobs=3, extra_body={"best_of": 3}
    )
    assert backends.params[-1].top_logprobs == 3
    rec = sqlite_store.get_completion(resp.id)
    assert rec.sampling["logprobs"] is True and rec.sampling["top_logprobs"] == 3
    for choice in resp.choices:
        cand = rec.candidates[choice.index]  # choices are the best ranked candidates
        got = content_of(choice.logprobs.content)
        assert got == expected_content(cand, 3)
        assert [c.logprob for c in choice.logprobs.content] == pytest.approx(cand.logprobs)
        # the answer's text is the tokens' text without surrounding white space
        assert "".join(c.token for c in choice.logprobs.content).strip() == choice.message.content
    # logprobs without top_logprobs: no alternatives; without logprobs: null
    plain = client.chat.completions.create(model="palm-rlhf", messages=MESSAGES, seed=5, logprobs=True)
    assert backends.params[-1].top_logprobs == 0
    assert plain.choices[0].logprobs.content and all(c.top_logprobs == [] for c in plain.choices[0].logprobs.content)
    assert client.chat.completions.create(model="palm-rlhf", messages=MESSAGES, seed=5).choices[0].logprobs is None


def test_streamed_logprobs_add_up_to_the_whole_answer(client, backends, sqlite_store):
    for best_of in (None, 3):  # streamed live (best_of == n) and ranked first (best_of > n)
        body = {"best_of": best_of} if best_of else {}
        stream = client.chat.completions.create(
            model="palm-rlhf", messages=MESSAGES, seed=8, n=2, logprobs=True, top_logprobs=2, stream=True,
            extra_body=body,
        )
        text: dict[int, str] = {}
        lps: dict[int, list] = {}
        ranks: dict[int, int] = {}
        cid = None
        for chunk in stream:
            cid = chunk.id
            for ch in chunk.choices:
                text[ch.index] = text.get(ch.index, "") + (ch.delta.content or "")
                if ch.logprobs is not None:
                    lps.setdefault(ch.index, []).extend(ch.logprobs.content or [])
                if ch.finish_reason:
                    ranks[ch.index] = ch.model_extra["rank"]
        rec = sqlite_store.get_completion(cid)
        for i, rank in ranks.items():
            cand = rec.candidates[rank]
            assert cand.text == text[i]
            assert content_of(lps[i]) == expected_content(cand, 2), best_of


def test_top_logprobs_limits(client):
    for body, param in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="palm-rlhf", messages=MESSAGES, **body)
        assert e.value.status_code == 400
        assert param in str(e.value)


# --------------------------------------------------------------------------------------------
# sampling controls: what reaches the policy


CONTROLS = {
    "presence_penalty": 0.5,
    "frequency_penalty": -1.0,
    "logit_bias": {"70": -100, "71": 5.5},
}
EXTRA = {"min_p": 0.1, "repetition_penalty": 1.3, "min_tokens": 4, "stop_token_ids": [9, 10], "ignore_eos": True}


def test_sampling_controls_reach_the_policy_and_the_log(client, backends, sqlite_store):
    for stream in (False, True):
        resp = client.chat.completions.create(
            model="palm-rlhf", messages=MESSAGES, seed=1, stream=stream, extra_body=EXTRA, **CONTROLS
        )
        p = backends.params[-1]
        assert (p.presence_penalty, p.frequency_penalty, p.logit_bias) == (0.5, -1.0, {70: -100.0, 71: 5.5})
        assert (p.min_p, p.repetition_penalty, p.min_tokens, p.stop_token_ids, p.ignore_eos) == (
            0.1, 1.3, 4, [9, 10], True
        )
        if not stream:
            rec = sqlite_store.get_completion(resp.id)
            assert rec.sampling["logit_bias"] == {"70": -100, "71": 5.5}
            assert rec.sampling["min_tokens"] == 4 and rec.sampling["ignore_eos"] is True
        else:
            list(resp)
    # and the policy's gRPC request carries them (unset ones stay unset)
    req = GrpcBackends._request(None, "x", 1, backends.params[-1])
    sp = req.params
    assert dict(sp.logit_bias) == {70: -100.0, 71: 5.5} and list(sp.stop_token_ids) == [9, 10]
    assert sp.presence_penalty == 0.5 and sp.frequency_penalty == -1.0 and sp.min_tokens == 4 and sp.ignore_eos
    assert sp.min_p == pytest.approx(0.1) and sp.repetition_penalty == pytest.approx(1.3)
    bare = GrpcBackends._request(None, "x", 1, SamplingOptions()).params
    assert not any(bare.HasField(f) for f in ("min_p", "presence_penalty", "repetition_penalty", "min_tokens"))
    assert not bare.logit_bias and not bare.ignore_eos and bare.top_logprobs == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_out_of_range_controls_are_a_400(client, backends, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="palm-rlhf", messages=MESSAGES, extra_body=body)
    assert e.value.param == param
    assert backends.calls == []


def test_unsupported_parameters_stay_refused(client, backends):
    for kw in (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "required"},
        {"response_format": {"type": "json_object"}},
        {"modalities": ["text", "audio"]},
        {"audio": {"voice": "alloy", "format": "wav"}},
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="palm-rlhf", messages=MESSAGES, **kw)
        assert e.value.param == next(iter(kw)) and "not supported" in str(e.value)
    assert backends.calls == []


# --------------------------------------------------------------------------------------------
# legacy completions


def test_legacy_completions_rank_store_and_report_logprobs(client, server, backends, sqlite_store):
    prompt = "Once upon a time"
    resp = client.completions.create(model="palm-rlhf", prompt=prompt, n=2, best_of=3, logprobs=2, seed=4,
                                     max_tokens=20)
    assert resp.object == "text_completion" and len(resp.choices) == 2
    assert backends.params[-1].stop == [] and backends.params[-1].top_logprobs == 2
    rec = sqlite_store.get_completion(resp.id)
    assert rec.prompt_text == prompt and rec.best_of == 3 and rec.n == 2 and rec.sampling["endpoint"] == "completions"
    rewards = [c.reward for c in rec.candidates]
    assert rewards == sorted(rewards, reverse=True)
    for ch in resp.choices:
        cand = rec.candidates[ch.index]
        assert ch.text == cand.text == cand.raw_text  # raw text: nothing trimmed
        lp = ch.logprobs
        assert lp.tokens == [chr(t - 4) for t in cand.token_ids]
        assert lp.token_logprobs == pytest.approx(cand.logprobs)
        assert [list(d) for d in lp.top_logprobs] == [[chr(t - 4), chr(4 + (t - 4 + 1) % 256 - 4)] for t in cand.token_ids]
        # offsets into prompt + completion
        assert lp.text_offset == [len(prompt) + j for j in range(len(cand.token_ids))]
    # feedback works on a legacy completion
    r = httpx.post(server.url + "/v1/feedback", headers={"Authorization": f"Bearer {KEY}"},
                   json={"completion_id": resp.id, "choice_index": 1, "thumbs": "up"})
    assert r.status_code == 200, r.text
    assert sqlite_store.list_feedback(resp.id)[0].choice_index == 1
    # without logprobs: null
    assert client.completions.create(model="palm-rlhf", prompt=prompt, seed=4).choices[0].logprobs is None
    assert backends.params[-1].max_tokens == 16  # OpenAI's default


def test_legacy_completions_of_several_prompts_and_streamed(client, backends, sqlite_store):
    prompts = ["first prompt", "second prompt"]
    resp = client.completions.create(model="palm-rlhf", prompt=prompts, n=2, seed=6)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    ids = resp.model_extra["palm_rlhf"]["completion_ids"]
    assert ids == [f"{resp.id}-0", f"{resp.id}-1"]
    for i, cid in enumerate(ids):
        rec = sqlite_store.get_completion(cid)
        assert rec.prompt_text == prompts[i]
        assert [c.text for c in rec.candidates[:2]] == [resp.choices[2 * i + r].text for r in range(2)]
    stream = client.completions.create(model="palm-rlhf", prompt=prompts, n=2, seed=6, stream=True,
                                       stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
        usage = chunk.usage or usage
    assert texts == {c.index: c.text for c in resp.choices}  # same seed: the same completions
    assert set(finish) == {0, 1, 2, 3} and usage.total_tokens == resp.usage.total_tokens


def test_legacy_completions_refuse_echo_suffix_and_unknown_models(client, backends):
    for kw, param in (({"echo": True}, "echo"), ({"suffix": "the end"}, "suffix")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="palm-rlhf", prompt="x", **kw)
        assert e.value.param == param and "not supported" in str(e.value)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="palm-rlhf", prompt=[])
    assert e.value.param == "prompt"
    assert backends.calls == []


# --------------------------------------------------------------------------------------------
# models


def test_named_versions_are_refused_saying_only_the_current_one_is_served(client, backends):
    assert [m.id for m in client.models.list()] == ["palm-rlhf"]
    for call in (
        lambda: client.models.retrieve("palm-rlhf@v0003"),
        lambda: client.chat.completions.create(model="palm-rlhf@v0003", messages=MESSAGES),
        lambda: client.completions.create(model="palm@v0001", prompt="x"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "model_not_found"
        assert "only the current version" in str(e.value)
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o@v1")
    assert "only the current version" not in str(e.value)
    assert backends.calls == []


# --------------------------------------------------------------------------------------------
# streamed choices and feedback


def test_streamed_rank_names_the_choice_feedback_takes(client, server, sqlite_store):
    """With best_of == n the choices stream in sample order (``index``); each one's last chunk
    carries ``rank``, its index by reward, which is what feedback takes."""
    stream = client.chat.completions.create(model="palm-rlhf", messages=MESSAGES, n=4, seed=21, stream=True)
    texts: dict[int, str] = {}
    ranks: dict[int, int] = {}
    cid = None
    for chunk in stream:
        cid = chunk.id
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                ranks[ch.index] = ch.model_extra["rank"]
    assert sorted(ranks.values()) == [0, 1, 2, 3]
    rec = sqlite_store.get_completion(cid)
    assert any(ranks[i] != i for i in ranks) or len({c.reward for c in rec.candidates}) == 1
    best = next(i for i, r in ranks.items() if r == 0)
    r = httpx.post(server.url + "/v1/feedback", headers={"Authorization": f"Bearer {KEY}"},
                   json={"completion_id": cid, "choice_index": ranks[best], "thumbs": "up"})
    assert r.status_code == 200, r.text
    assert rec.candidates[ranks[best]].text == texts[best]
    assert rec.candidates[0].reward == max(c.reward for c in rec.candidates)


# --------------------------------------------------------------------------------------------
# end to end through the real policy service


def stored(stack, cid):
    with open_store(f"sqlite:///{stack.db_path}") as store:
        return store.get_completion(cid)


def test_logprobs_end_to_end_are_the_policys(stack):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=E2E_KEY, max_retries=0)
    resp = client.chat.completions.create(model="palm-rlhf", messages=[{"role": "user", "content": "Tell me a story."}],
                                          max_tokens=12, temperature=0.9, seed=3, logprobs=True, top_logprobs=5,
                                          extra_body={"ignore_eos": True})
    rec = stored(stack, resp.id)
    cand = rec.candidates[0]
    content = resp.choices[0].logprobs.content
    assert len(content) == len(cand.token_ids) >= 1
    for c, t, lp in zip(content, cand.token_ids, cand.logprobs):
        assert c.bytes == ([t - 4] if t >= 4 else [])  # the byte tokenizer
        assert c.logprob == pytest.approx(lp, abs=1e-6)
        alts = [a.logprob for a in c.top_logprobs]
        assert len(alts) == 5 and alts == sorted(alts, reverse=True)
        # the sampled token is either among the alternatives (with the same log-prob) or less likely
        same = [a for a in c.top_logprobs if a.bytes == c.bytes]
        assert (same and same[0].logprob == pytest.approx(c.logprob, abs=1e-5)) or c.logprob <= alts[-1] + 1e-6
    # greedy: the chosen token is always the most likely alternative
    greedy = client.chat.completions.create(model="palm-rlhf", messages=[{"role": "user", "content": "Hi."}],
                                            max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    for c in greedy.choices[0].logprobs.content:
        assert c.top_logprobs[0].bytes == c.bytes and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
    # legacy completions of the same prompt text report the same tokens and log-probs
    greedy_rec = stored(stack, greedy.id)
    legacy = client.completions.create(model="palm-rlhf", prompt=greedy_rec.prompt_text, max_tokens=8, temperature=0,
                                       logprobs=2, extra_body={"ignore_eos": True})
    n = len(greedy.choices[0].logprobs.content)
    assert legacy.choices[0].logprobs.token_logprobs[:n] == pytest.approx(
        [c.logprob for c in greedy.choices[0].logprobs.content], abs=1e-5
    )


def test_logit_bias_and_min_tokens_end_to_end(stack):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=E2E_KEY, max_retries=0)
    prompt = "The sea is"

    def ids(**kw):
        resp = client.completions.create(model="palm-rlhf", prompt=prompt, max_tokens=10, temperature=0, **kw)
        return stored(stack, resp.id).candidates[0].token_ids, resp

    greedy, _ = ids(extra_body={"ignore_eos": True})
    assert len(greedy) == 10
    first = greedy[0]
    banned, _ = ids(logit_bias={str(first): -100}, extra_body={"ignore_eos": True})
    assert banned[0] != first and first not in banned
    # frequency penalty on a model that repeats itself: fewer repeats
    plain, _ = ids(extra_body={"ignore_eos": True})
    penalised, _ = ids(frequency_penalty=2.0, extra_body={"ignore_eos": True})
    assert len(set(penalised)) >= len(set(plain))
    # EOS made the likeliest token: the text ends at once, unless min_tokens holds it off
    eos = {"2": 100}
    none, resp = ids(logit_bias=eos)
    assert none == [] and resp.choices[0].finish_reason == "stop"
    five, resp = ids(logit_bias=eos, extra_body={"min_tokens": 5})
    assert len(five) == 5 and 2 not in five and resp.choices[0].finish_reason == "stop"
    # ignore_eos runs to max_tokens; stop_token_ids stops at that id
    all_eos, resp = ids(logit_bias=eos, extra_body={"ignore_eos": True})
    assert all_eos == [2] * 10 and resp.choices[0].finish_reason == "length"
    stop_at = next(t for t in penalised[1:] if t != penalised[0])
    cut, resp = ids(frequency_penalty=2.0, extra_body={"ignore_eos": True, "stop_token_ids": [stop_at]})
    assert cut == penalised[: penalised.index(stop_at)] and resp.choices[0].finish_reason == "stop"
    # min_p 1 at temperature 1: the greedy answer, whatever the seed
    for seed in (1, 2):
        resp = client.completions.create(model="palm-rlhf", prompt=prompt, max_tokens=10, temperature=1.0, seed=seed,
                                         extra_body={"min_p": 1.0, "ignore_eos": True})
        assert stored(stack, resp.id).candidates[0].token_ids == greedy
