"""Variable-length attention: key-padding masks in the fused kernel (forward and backward),
per-row first slots in the decode kernel, and the model paths that use them (mixed-length
generation, a continuous batch, padded scoring, reward training, an autocast training step),
each checked against PyTorch with spies proving the kernels ran and no call fell back."""

from __future__ import annotations

import pytest
import torch
from _kernel_testing import DEVICE, TOL, assert_close, max_rel_err

from kernels import attention as attention_module
from kernels import dispatch, fallbacks
from kernels.attention import triton_attention, triton_decode_attention

palm_rlhf = pytest.importorskip("palm_rlhf")


def masked_ref(q, k, v, key_valid, causal, scale=None):
    """float64 attention under dispatch.dense_key_mask(key_valid) (empty rows give zeros)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    allowed = dispatch.dense_key_mask(key_valid, q.shape[2], causal)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return probs @ v


def _key_valid(batch: int, n: int) -> torch.Tensor:
    kv = torch.ones(batch, n, dtype=torch.bool, device=DEVICE)
    kv[0, :7] = False  # left padding
    if batch > 1:
        kv[1, n - 9 :] = False  # right padding
    if batch > 2:
        kv[2, 1::3] = False  # an arbitrary pattern
    return kv


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,n", [(2, 1, 37), (4, 2, 20)])
def test_key_padding_forward_backward(causal, dtype, heads, kv_heads, n):
    torch.manual_seed(0)
    batch, d = 3, 32
    q = torch.randn(batch, heads, n, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, n, d, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, n, d, device=DEVICE, dtype=dtype, requires_grad=True)
    kv = _key_valid(batch, n)
    out = triton_attention(q, k, v, causal=causal, key_valid=kv)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = masked_ref(q64, k64, v64, kv, causal)
    assert_close(out, ref, dtype, "output")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, dtype, f"d{name}")


def test_key_padding_changes_the_result():
    """The mask is not ignored: masked keys change the output against the unmasked kernel."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 24, 32, device=DEVICE) for _ in range(3))
    kv = _key_valid(2, 24)
    masked = triton_attention(q, k[:, :1], v[:, :1], causal=False, key_valid=kv)
    plain = triton_attention(q, k[:, :1], v[:, :1], causal=False)
    assert max_rel_err(masked, plain) > 1e-2


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_first_slot(num_splits, dtype):
    torch.manual_seed(2)
    batch, heads, d, max_len = 3, 4, 32, 70
    q = torch.randn(batch, heads, 1, d, device=DEVICE, dtype=dtype)
    kc = torch.randn(batch, 1, max_len, d, device=DEVICE, dtype=dtype)
    vc = torch.randn(batch, 1, max_len, d, device=DEVICE, dtype=dtype)
    lens = torch.tensor([60, 45, 70], device=DEVICE)
    first = torch.tensor([0, 20, 50], device=DEVICE)  # the last row's first slot lies in a later split
    out = triton_decode_attention(q, kc, vc, lens, first_slot=first, num_splits=num_splits)
    ref = dispatch._decode_attention_torch(q.double(), kc.double(), vc.double(), lens, None, first)
    assert_close(out, ref, dtype, "decode output")
    no_first = triton_decode_attention(q, kc, vc, lens, num_splits=num_splits)
    assert max_rel_err(no_first, ref) > 1e-2  # the first slot matters


# --- dispatch and the fallback counter --------------------------------------------------


def test_fallbacks_are_counted_by_reason_and_only_when_kernels_were_asked_for():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    k = v = torch.randn(1, 1, 8, 16, device=DEVICE)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool, device=DEVICE)
    fallbacks.reset()
    with dispatch.use_backend("torch"):
        dispatch.attention(q, k, v, attn_mask=mask)
    assert fallbacks.snapshot() == {}
    with dispatch.use_backend("triton"):
        dispatch.attention(q, k, v, attn_mask=mask)
        dispatch.attention(q, k, v, attn_mask=mask)
        dispatch.attention(q, k, v, dropout_p=0.5)
        dispatch.attention(q, k, v, key_valid=torch.ones(1, 8, dtype=torch.bool, device=DEVICE))
    assert fallbacks.snapshot() == {("attention", "attn_mask"): 2, ("attention", "dropout"): 1}
    fallbacks.reset()


# --- the model on the kernels -----------------------------------------------------------


class Spy:
    """Counts the kernel entry points and what they were given."""

    def __init__(self, monkeypatch):
        self.prefill = self.prefill_masked = self.decode = self.decode_first = 0
        real_attn, real_decode = attention_module.triton_attention, attention_module.triton_decode_attention

        def attn(*a, key_valid=None, **k):
            self.prefill += 1
            self.prefill_masked += key_valid is not None
            return real_attn(*a, key_valid=key_valid, **k)

        def decode(*a, first_slot=None, **k):
            self.decode += 1
            self.decode_first += first_slot is not None
            return real_decode(*a, first_slot=first_slot, **k)

        monkeypatch.setattr(attention_module, "triton_attention", attn)
        monkeypatch.setattr(attention_module, "triton_decode_attention", decode)


def tiny(**kw):
    torch.manual_seed(0)
    cfg = {"num_tokens": 48, "dim": 32, "depth": 2, "dim_head": 16, "heads": 2}
    cfg.update(kw)
    return palm_rlhf.PaLM(**cfg).to(DEVICE).eval()


def _same_results(got, want):
    for a, b in zip(got, want):
        assert a[0].token_ids == b[0].token_ids
        assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-4)


def test_mixed_length_generation_runs_on_the_kernels(monkeypatch):
    from palm_rlhf import SamplingParams, generate_tokens

    model = tiny()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1]]
    params = SamplingParams(max_new_tokens=5, temperature=0)
    with dispatch.use_backend("torch"):
        want = generate_tokens(model, prompts, params)
    spy = Spy(monkeypatch)
    fallbacks.reset()
    with dispatch.use_backend("triton"):
        got = generate_tokens(model, prompts, params)
    assert fallbacks.snapshot() == {}
    assert spy.prefill == spy.prefill_masked == 2  # one padded prefill per layer
    assert spy.decode == spy.decode_first == 4 * 2  # every decode step, per-row first slots
    _same_results(got, want)


def test_continuous_batch_with_joins_and_leaves_runs_on_the_kernels(monkeypatch):
    from palm_rlhf import SamplingParams
    from palm_rlhf.generation import DecodeSession

    model = tiny()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1], [5, 5, 5]]
    short = SamplingParams(max_new_tokens=3, temperature=0)
    params = SamplingParams(max_new_tokens=8, temperature=0)

    def run():
        session, out = DecodeSession(model), {}
        session.add([prompts[0]], params, tag=0)
        step = 0
        while session:
            if step == 1:
                session.add([prompts[1]], short, tag=1)  # joins, leaves early
            if step == 2:
                session.add([prompts[2]], params, tag=2)
            if step == 4:
                session.add([prompts[3]], params, tag=3)  # joins after a row left
            for ev in session.step():
                out.setdefault(ev.row.tag, []).append((ev.token, ev.logprob))
            step += 1
        return out

    with dispatch.use_backend("torch"):
        want = run()
    spy = Spy(monkeypatch)
    fallbacks.reset()
    with dispatch.use_backend("triton"):
        got = run()
    assert fallbacks.snapshot() == {}
    assert spy.decode > 0 and spy.decode_first > 0  # the left-padded batch stayed on the decode kernel
    assert spy.prefill > 0
    assert got.keys() == want.keys()
    for tag in want:
        assert [t for t, _ in got[tag]] == [t for t, _ in want[tag]]
        assert [lp for _, lp in got[tag]] == pytest.approx([lp for _, lp in want[tag]], abs=1e-4)


def _padded_batch(n=14):
    torch.manual_seed(3)
    tokens = torch.randint(1, 48, (3, n), device=DEVICE)
    mask = torch.ones(3, n, dtype=torch.bool, device=DEVICE)
    mask[0, n - 5 :] = False  # right padding
    mask[1, :4] = False  # left padding
    return tokens, mask


def test_reward_scoring_of_padded_rows_runs_on_the_kernels(monkeypatch):
    from palm_rlhf.reward import RewardModel

    reward = RewardModel(tiny(), dropout=0.0).to(DEVICE).eval()
    tokens, mask = _padded_batch()
    prompt_lengths = torch.tensor([3, 6, 2], device=DEVICE)
    with torch.no_grad():
        with dispatch.use_backend("torch"):
            want = reward(tokens, mask=mask, prompt_lengths=prompt_lengths)
        spy = Spy(monkeypatch)
        fallbacks.reset()
        with dispatch.use_backend("triton"):
            got = reward(tokens, mask=mask, prompt_lengths=prompt_lengths)
    assert fallbacks.snapshot() == {}
    assert spy.prefill == spy.prefill_masked == 2
    assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_masked_training_step_matches_pytorch(monkeypatch, causal):
    """Reward / PPO training: a padded batch through forward and backward (causal with left
    and right padding; non-causal with a key-padding mask)."""
    model = tiny(causal=causal).train()
    tokens, mask = _padded_batch()

    def loss_and_grads(backend):
        model.zero_grad(set_to_none=True)
        with dispatch.use_backend(backend):
            emb = model(tokens, mask=mask, return_only_embedding=True)
            loss = (emb * mask[..., None]).pow(2).mean()
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads("torch")
    spy = Spy(monkeypatch)
    fallbacks.reset()
    loss, grads = loss_and_grads("triton")
    assert fallbacks.snapshot() == {}
    assert spy.prefill == spy.prefill_masked == 2
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert max_rel_err(g, ref_grads[name]) <= 1e-4, name


def test_autocast_training_step_runs_on_the_kernels(monkeypatch):
    model = tiny().train()
    tokens = torch.randint(1, 48, (2, 20), device=DEVICE)
    device_type = torch.device(DEVICE).type

    def loss_and_grads(backend):
        model.zero_grad(set_to_none=True)
        with dispatch.use_backend(backend), torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(tokens, return_loss=True)
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads("torch")
    spy = Spy(monkeypatch)
    fallbacks.reset()
    loss, grads = loss_and_grads("triton")
    assert fallbacks.snapshot() == {}
    assert spy.prefill == 2
    tol = TOL[torch.bfloat16]
    assert abs(loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item()))
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert max_rel_err(g, ref_grads[name]) <= tol, name


def test_kernel_report_names_every_path():
    from kernels.report import PATHS, format_kernel_report, kernel_report

    model = tiny()
    with dispatch.use_backend("triton"):
        report = kernel_report(model)
        text = format_kernel_report(model)
    assert set(report) == set(PATHS)
    assert all(r["backend"] == "triton" for r in report.values())
    assert all(what in text for what in PATHS.values())
    with dispatch.use_backend("torch"):
        report = kernel_report(model, device="cpu")
    assert report["prefill"]["backend"] == "torch" and report["decode"]["backend"] == "cpu"
    big = tiny(dim_head=160, heads=1)
    with dispatch.use_backend("triton"):
        report = kernel_report(big)
    assert report["prefill"]["backend"] == "torch" and "head dim" in report["prefill"]["reason"]
    assert report["swiglu"]["backend"] == "triton"


def test_cached_forward_masks_without_row_start(monkeypatch):
    """forward_cached recovers the kernels' form from the masks when no row_start is given;
    a decode mask of another form (a hole in the middle) takes PyTorch and is counted."""
    from palm_rlhf.generation import KVCache

    model = tiny()
    cfg = model.config
    pad = torch.tensor([0, 3, 5], device=DEVICE)
    n = 8
    tokens = torch.randint(1, 48, (3, n), device=DEVICE)
    positions = (torch.arange(n, device=DEVICE)[None] - pad[:, None]).clamp(min=0)
    key_valid = torch.arange(n, device=DEVICE)[None] >= pad[:, None]
    causal = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()
    prefill_mask = (key_valid[:, None, None, :] & causal) | torch.eye(n, dtype=torch.bool, device=DEVICE)
    slots = torch.arange(n + 1, device=DEVICE)
    decode_mask = (slots[None] >= pad[:, None])[:, None, None, :]
    holed = decode_mask.clone()
    holed[0, 0, 0, 2] = False
    nxt = torch.randint(1, 48, (3, 1), device=DEVICE)

    def run(backend, step_mask, row_start=None):
        cache = KVCache(cfg.depth, 3, n + 1, cfg.dim_head, DEVICE, model.dtype)
        with torch.no_grad(), dispatch.use_backend(backend):
            first = model.forward_cached(tokens, positions, cache.layers(), 0, attn_mask=prefill_mask,
                                         row_start=row_start)
            second = model.forward_cached(nxt, (n - pad)[:, None], cache.layers(), n, decode_mask=step_mask,
                                          row_start=row_start)
        return first, second

    want = run("torch", decode_mask)
    spy = Spy(monkeypatch)
    fallbacks.reset()
    for row_start in (None, pad):
        got = run("triton", decode_mask, row_start)
        for g, w in zip(got, want):
            assert max_rel_err(g, w) <= 1e-5
    assert fallbacks.snapshot() == {}
    assert spy.prefill == spy.prefill_masked == 2 * 2 and spy.decode == spy.decode_first == 2 * 2

    want = run("torch", holed)
    got = run("triton", holed)
    assert max_rel_err(got[1], want[1]) <= 1e-5
    assert fallbacks.snapshot() == {("decode_attention", "decode_mask"): 2}  # one per layer
