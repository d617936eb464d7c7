"""The generation engine: KV cache, mixed-length batches, sampling controls, log-probs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from palm_rlhf import GenerationError, PaLM, SamplingParams, generate_tokens, stream_generate
from palm_rlhf.generation import DecodeSession


@pytest.fixture(scope="module")
def model() -> PaLM:
    torch.manual_seed(1)
    return PaLM(num_tokens=40, dim=32, depth=2, dim_head=8, heads=4, max_seq_len=128).eval()


def stepwise_greedy(model, prompt, n):
    seq, out = list(prompt), []
    for _ in range(n):
        tok = int(model(torch.tensor([seq]))[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
    return out


def test_cached_greedy_equals_full_forward_argmax(model):
    prompt = [5, 9, 2, 33, 7]
    res = generate_tokens(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0))
    assert res[0][0].token_ids == stepwise_greedy(model, prompt, 12)
    assert res[0][0].finish_reason == "length"


def test_mixed_length_batch_equals_prompts_run_alone(model):
    prompts = [[3, 4], [10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23]]
    params = SamplingParams(max_new_tokens=9, temperature=0)
    together = generate_tokens(model, prompts, params)
    for p, got in zip(prompts, together):
        alone = generate_tokens(model, [p], params)[0][0]
        assert got[0].token_ids == alone.token_ids
        assert got[0].logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_logprobs_are_the_models_own_distribution(model):
    prompt = [1, 2, 3, 4]
    res = generate_tokens(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0.7, top_k=5, seed=3))[0][0]
    seq = torch.tensor([prompt + res.token_ids])
    logp = F.log_softmax(model(seq)[0, len(prompt) - 1 : -1], dim=-1)
    expected = logp.gather(-1, torch.tensor(res.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(res.logprobs), expected, atol=1e-4)
    assert torch.allclose(model.logprobs_of(seq)[0, len(prompt) - 1 :], expected, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_samples_differ(model):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=42, n=4)
    a = generate_tokens(model, [[1, 2, 3]], params)[0]
    b = generate_tokens(model, [[1, 2, 3]], params)[0]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) > 1  # n samples are not copies of one
    # the same request shares a batch with another prompt: its samples do not change
    mixed = generate_tokens(model, [[7, 7, 7, 7, 7], [1, 2, 3]], [SamplingParams(max_new_tokens=3), params])[1]
    assert [c.token_ids for c in mixed] == [c.token_ids for c in a]


def test_top_k_one_is_greedy_and_top_k_limits_support(model):
    prompt = [4, 8, 15]
    greedy = generate_tokens(model, [prompt], SamplingParams(max_new_tokens=8, temperature=0))[0][0]
    k1 = generate_tokens(model, [prompt], SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=0))[0][0]
    assert k1.token_ids == greedy.token_ids
    # with top_k=3 every sampled first token is among the 3 most likely
    top3 = set(model(torch.tensor([prompt]))[0, -1].topk(3).indices.tolist())
    res = generate_tokens(model, [prompt], SamplingParams(max_new_tokens=1, temperature=2.0, top_k=3, n=64, seed=1))
    firsts = {c.token_ids[0] for c in res[0]}
    assert firsts <= top3 and len(firsts) > 1


def test_top_p_keeps_the_nucleus(model):
    prompt = [4, 8, 15]
    probs = model(torch.tensor([prompt]))[0, -1].softmax(-1)
    sorted_p, idx = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < 0.3
    nucleus = set(idx[keep].tolist())
    res = generate_tokens(model, [prompt], SamplingParams(max_new_tokens=1, top_p=0.3, n=64, seed=2))
    assert {c.token_ids[0] for c in res[0]} <= nucleus


def test_stop_tokens_and_per_prompt_lengths(model):
    prompt = [5, 9, 2]
    greedy = stepwise_greedy(model, prompt, 10)
    stop = greedy[3]
    first = greedy.index(stop)
    res = generate_tokens(
        model,
        [prompt, [1, 1]],
        [SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=(stop,)), SamplingParams(max_new_tokens=4)],
    )
    assert res[0][0].token_ids == greedy[: first + 1] and res[0][0].finish_reason == "stop"
    assert len(res[1][0].token_ids) == 4 and res[1][0].finish_reason == "length"


def test_stream_matches_batch_result(model):
    prompts = [[3, 4, 5], [6]]
    params = SamplingParams(max_new_tokens=5, temperature=0)
    streamed: dict = {}
    for step in stream_generate(model, prompts, params):
        for r, key in enumerate(step.rows):
            if step.tokens[r] is not None:
                streamed.setdefault(key, []).append(step.tokens[r])
    full = generate_tokens(model, prompts, params)
    assert streamed[(0, 0)] == full[0][0].token_ids and streamed[(1, 0)] == full[1][0].token_ids


@pytest.mark.parametrize(
    "prompts,params,match",
    [
        ([[]], SamplingParams(), "empty"),
        ([[1, 99]], SamplingParams(), "outside the vocabulary"),
        ([[1]], SamplingParams(temperature=-1), "temperature"),
        ([[1]], SamplingParams(temperature=float("nan")), "temperature"),
        ([[1]], SamplingParams(top_p=0), "top_p"),
        ([[1]], SamplingParams(top_k=-2), "top_k"),
        ([[1]], SamplingParams(n=0), "n must"),
        ([[1]], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([[1] * 100], SamplingParams(max_new_tokens=100), "max_seq_len"),
        ([[1]], SamplingParams(stop_token_ids=(400,)), "stop token"),
    ],
)
def test_invalid_input_is_rejected_with_a_clear_message(model, prompts, params, match):
    with pytest.raises(GenerationError, match=match):
        generate_tokens(model, prompts, params)


def test_lora_scope_changes_generation(model):
    m = PaLM(model.config)
    m.load_state_dict(model.state_dict())
    m.eval()
    m.add_finetune_params("actor", lora_r=4)
    with torch.no_grad():
        for layer in m.finetune_modules["actor"]:
            layer.ff_out.B.normal_(std=1.0)
    prompt = [[3, 4, 5]]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    base = generate_tokens(m, prompt, params)[0][0].token_ids
    assert generate_tokens(m, prompt, params, disable_lora=True)[0][0].token_ids == base
    tuned = generate_tokens(m, prompt, params, finetune_scope="actor")[0][0]
    seq = torch.tensor([prompt[0] + tuned.token_ids])
    expected = stepwise = []
    s = list(prompt[0])
    for _ in range(8):
        t = int(m(torch.tensor([s]), finetune_scope="actor")[0, -1].argmax())
        stepwise.append(t)
        s.append(t)
    assert tuned.token_ids == expected
    assert seq.shape[1] == 11


def test_bfloat16_generation_runs(model):
    m = PaLM(model.config)
    m.load_state_dict(model.state_dict())
    m = m.eval().to(torch.bfloat16)
    res = generate_tokens(m, [[1, 2, 3]], SamplingParams(max_new_tokens=5, n=2, seed=0))
    assert all(len(c.token_ids) == 5 for c in res[0])


def test_one_seed_shared_by_different_prompts_draws_different_noise(model):
    # a flat distribution makes the draw depend on the noise alone
    params = SamplingParams(max_new_tokens=8, temperature=50.0, seed=7)
    a, b = generate_tokens(model, [[1, 2, 3], [1, 2, 4]], params)
    assert a[0].token_ids != b[0].token_ids
    again = generate_tokens(model, [[1, 2, 4]], params)[0]
    assert again[0].token_ids == b[0].token_ids


def test_checkpoint_files_are_readable_by_other_users(tmp_path):
    import stat

    from palm_rlhf.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "ck", {"w": torch.ones(2)}, {"dim": 2})
    assert stat.S_IMODE(path.stat().st_mode) & 0o005 == 0o005
    assert all(stat.S_IMODE(f.stat().st_mode) & 0o004 for f in path.iterdir())


# --- sampling controls: logit bias, min-p, penalties, minimum length, top-k log-probs -------


PROMPT = [5, 9, 2, 33, 7]


def greedy(model, n=12, prompt=PROMPT, **kw):
    return generate_tokens(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0, **kw))[0][0]


def session_run(model, jobs):
    """Run (name, prompt, params) jobs together in one DecodeSession; tokens per (name, sample)."""
    session = DecodeSession(model)
    for name, prompt, sp in jobs:
        session.add([prompt], sp, tag=name)
    out: dict = {}
    while session:
        for ev in session.step():
            out.setdefault((ev.row.tag, ev.row.sample_index), []).append(ev)
    return out


def test_logit_bias_minus_100_bans_the_greedy_token(model):
    base = greedy(model).token_ids
    first = base[0]
    biased = greedy(model, logit_bias={first: -100.0}).token_ids
    assert biased[0] != first and first not in biased
    # sampled rows never draw it either
    res = generate_tokens(model, [PROMPT], SamplingParams(max_new_tokens=30, temperature=1.5, seed=3, n=4,
                                                          logit_bias={first: -100.0}))
    assert all(first not in c.token_ids for c in res[0])
    # a positive bias makes a token the greedy choice; the reported log-prob stays the model's own
    pick = next(t for t in range(40) if t != first)
    forced = greedy(model, n=3, logit_bias={pick: 100.0})
    assert forced.token_ids == [pick] * 3
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT]))[0, -1]
    assert forced.logprobs[0] == pytest.approx(float(F.log_softmax(logits, -1)[pick]), abs=1e-5)


def test_min_p_one_at_temperature_one_is_greedy(model):
    base = greedy(model, n=15).token_ids
    for seed in (1, 2, 3):
        res = generate_tokens(model, [PROMPT], SamplingParams(max_new_tokens=15, temperature=1.0, seed=seed, min_p=1.0))
        assert res[0][0].token_ids == base
    free = [generate_tokens(model, [PROMPT], SamplingParams(max_new_tokens=15, temperature=1.0, seed=s))[0][0].token_ids
            for s in (1, 2, 3)]
    assert any(f != base for f in free)


def repeats(ids):
    return len(ids) - len(set(ids))


def test_frequency_and_presence_penalties_reduce_repeats(model):
    base = greedy(model, n=40).token_ids
    assert repeats(base) > 20  # a small greedy model loops
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 3.0}):
        got = greedy(model, n=40, **kw).token_ids
        assert repeats(got) < repeats(base) - 5, (kw, got, base)
    # a negative frequency penalty encourages repeats
    assert repeats(greedy(model, n=40, frequency_penalty=-2.0).token_ids) >= repeats(base)


def test_repetition_penalty_covers_the_prompt(model):
    # a prompt the model continues with one of its own tokens (the greedy model loops)
    looped = greedy(model, n=40).token_ids
    k = next(k for k in range(1, 40) if looped[k] in looped[:k])
    prompt = [*PROMPT, *looped[:k]]
    nxt = greedy(model, n=1, prompt=prompt).token_ids[0]
    assert nxt in prompt
    penalised = greedy(model, n=1, prompt=prompt, repetition_penalty=50.0).token_ids[0]
    assert penalised not in prompt


def test_min_tokens_delays_the_stop_token(model):
    base = greedy(model, n=20).token_ids
    stop = base[2]
    stopped = greedy(model, n=20, stop_token_ids=(stop,))
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) == 3
    late = greedy(model, n=20, stop_token_ids=(stop,), min_tokens=8)
    assert len(late.token_ids) > 8 and stop not in late.token_ids[:8]


def test_top_logprobs_are_the_models_most_likely_tokens(model):
    res = generate_tokens(model, [PROMPT], SamplingParams(max_new_tokens=6, temperature=1.0, seed=4, top_logprobs=5))
    c = res[0][0]
    assert len(c.top_logprobs) == len(c.token_ids) == 6
    seq = list(PROMPT)
    for tok, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([seq]))[0, -1], -1)
        vals, ids = logp.topk(5)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-4)
        assert lp == pytest.approx(float(logp[tok]), abs=1e-4)
        seq.append(tok)
    assert generate_tokens(model, [PROMPT], SamplingParams(max_new_tokens=3))[0][0].top_logprobs == []


def test_decode_session_rows_with_different_controls_match_running_alone(model):
    first = greedy(model).token_ids[0]
    stop = greedy(model, n=20).token_ids[2]
    jobs = [
        ("plain", PROMPT, SamplingParams(max_new_tokens=12, temperature=0)),
        ("bias", PROMPT, SamplingParams(max_new_tokens=12, temperature=0, logit_bias={first: -100.0})),
        ("freq", [3, 4], SamplingParams(max_new_tokens=12, temperature=0, frequency_penalty=1.5, top_logprobs=3)),
        ("minp", PROMPT, SamplingParams(max_new_tokens=12, temperature=1.0, seed=2, min_p=0.3, n=2)),
        ("min_tokens", PROMPT, SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=(stop,), min_tokens=6)),
        ("rep", [7, 8, 9], SamplingParams(max_new_tokens=10, temperature=0.8, seed=5, repetition_penalty=2.0)),
    ]
    together = session_run(model, jobs)
    for name, prompt, sp in jobs:
        alone = generate_tokens(model, [prompt], sp)[0]
        for j, c in enumerate(alone):
            evs = together[(name, j)]
            assert [e.token for e in evs] == c.token_ids, name
            if sp.top_logprobs:
                assert [[t for t, _ in e.top] for e in evs] == [[t for t, _ in top] for top in c.top_logprobs]
    # rows joining a running batch mid-way keep their own penalty counts
    session = DecodeSession(model)
    session.add([PROMPT], SamplingParams(max_new_tokens=16, temperature=0), tag="a")
    got: dict = {}
    for _ in range(4):
        for ev in session.step():
            got.setdefault(ev.row.tag, []).append(ev.token)
    session.add([[3, 4]], SamplingParams(max_new_tokens=12, temperature=0, frequency_penalty=1.5), tag="b")
    while session:
        for ev in session.step():
            got.setdefault(ev.row.tag, []).append(ev.token)
    assert got["b"] == generate_tokens(model, [[3, 4]], jobs[2][2])[0][0].token_ids
    assert got["a"] == greedy(model, n=16).token_ids


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (SamplingParams(min_p=1.5), "min_p"),
        (SamplingParams(repetition_penalty=0), "repetition_penalty"),
        (SamplingParams(presence_penalty=float("nan")), "presence_penalty"),
        (SamplingParams(logit_bias={99: 1.0}), "logit_bias"),
        (SamplingParams(max_new_tokens=4, min_tokens=5), "min_tokens"),
        (SamplingParams(top_logprobs=-1), "top_logprobs"),
    ],
)
def test_invalid_controls_are_rejected(model, params, match):
    with pytest.raises(GenerationError, match=match):
        generate_tokens(model, [PROMPT], params)
