"""The C kernel for the small operations of a CPU decode step (kernels/cpu_decode.py): it
must match the PyTorch computation, write the caches the same way, be what the engine runs,
and leave the model working when it cannot be built."""

from __future__ import annotations

import contextlib
import logging
import os

import pytest
import torch

from kernels import cpu_decode, settings
from palm_rlhf import PaLM, SamplingParams, generate_tokens

needs_kernel = pytest.mark.skipif(not cpu_decode.available(), reason="the CPU decode kernel could not be built here")
# the engine's CPU decode runner calls the kernel wherever it is available (with oneDNN-reordered
# projections where oneDNN passes its checks for the dtype, plain ones elsewhere)
needs_engine_kernel = pytest.mark.skipif(
    not cpu_decode.available(), reason="the engine's kernel path needs the CPU decode kernel, not built here"
)


@pytest.fixture
def kernel_off():
    """The PyTorch path, decided afresh; the kernel is decided afresh again afterwards."""
    with settings.override(cpu_kernel=False):
        cpu_decode.reset()
        yield
    cpu_decode.reset()


@pytest.fixture
def use_settings():
    """``use_settings(**changes)``: other settings until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(settings.override(**changes))


def inputs(rows, heads, d, ff, slots, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(rows, heads * d + 2 * d + 2 * ff, generator=gen)
    angle = torch.rand(d // 2, generator=gen) * 6
    cos = torch.cat((angle.cos(), angle.cos()))
    sin = torch.cat((-angle.sin(), angle.sin()))
    k = torch.randn(rows, 1, slots, d, generator=gen)
    v = torch.randn(rows, 1, slots, d, generator=gen)
    return [t.to(dtype) for t in (fused, cos, sin, k, v)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,d,ff", [(8, 64, 96), (3, 16, 40), (2, 48, 8)])  # 48: no specialised path
@pytest.mark.parametrize("rows,pos,start", [(1, 0, 0), (1, 37, 0), (3, 21, 0), (2, 40, 9)])
def test_kernel_matches_the_pytorch_computation(dtype, heads, d, ff, rows, pos, start):
    fused, cos, sin, k, v = inputs(rows, heads, d, ff, 48, dtype)
    k_ref, v_ref = k.double(), v.double()
    want = cpu_decode.reference(fused.double(), cos.double(), sin.double(), k_ref, v_ref, pos, heads, ff, 0.2, start)
    got = cpu_decode.attn_swiglu(fused, cos, sin, k, v, pos, heads, ff, 0.2, start=start)
    assert got.shape == (rows, heads * d + ff) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # the new key (rotated) and value land at slot pos; every other slot is untouched
    torch.testing.assert_close(k.double(), k_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(v.double(), v_ref, rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_first_slots_and_rotary_rows_match_the_pytorch_computation(dtype):
    """A left-padded batch: each row attends from its own first slot, at its own position."""
    rows, heads, d, ff, pos = 4, 3, 16, 24, 30
    fused, _, _, k, v = inputs(rows, heads, d, ff, 40, dtype, seed=3)
    angle = torch.rand(rows, d // 2, generator=torch.Generator().manual_seed(4)) * 6
    cos = torch.cat((angle.cos(), angle.cos()), dim=-1).to(dtype)
    sin = torch.cat((-angle.sin(), angle.sin()), dim=-1).to(dtype)
    starts = torch.tensor([0, 7, 30, 12])
    k_ref, v_ref = k.double(), v.double()
    want = cpu_decode.reference(fused.double(), cos.double(), sin.double(), k_ref, v_ref, pos, heads, ff, 0.25, starts)
    got = cpu_decode.attn_swiglu(fused, cos, sin, k, v, pos, heads, ff, 0.25, start=starts)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(k.double(), k_ref, rtol=tol, atol=tol)
    # the rows differ: one row's answer is not another's with a different start
    assert not torch.allclose(got[1], got[3])


@needs_kernel
def test_keys_before_start_are_not_attended():
    fused, cos, sin, k, v = inputs(1, 2, 16, 8, 20, torch.float32)
    a = cpu_decode.attn_swiglu(fused, cos, sin, k.clone(), v.clone(), 10, 2, 8, 0.3, start=4)
    k[:, :, :4] = 1e3  # garbage before the start slot changes nothing
    v[:, :, :4] = -1e3
    b = cpu_decode.attn_swiglu(fused, cos, sin, k, v, 10, 2, 8, 0.3, start=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_kernel
def test_a_bad_slot_range_raises():
    fused, cos, sin, k, v = inputs(1, 2, 16, 8, 20, torch.float32)
    with pytest.raises(RuntimeError, match="failed"):
        cpu_decode.attn_swiglu(fused, cos, sin, k, v, 3, 2, 8, 0.3, start=5)


def tiny(dtype=torch.float32, **kw) -> PaLM:
    torch.manual_seed(0)
    base = {"num_tokens": 64, "dim": 48, "depth": 2, "dim_head": 16, "heads": 3}
    base.update(kw)
    return PaLM(**base).eval().to(dtype)


def run(model, n=1, temperature=0.0, seed=None):
    params = SamplingParams(max_new_tokens=24, temperature=temperature, n=n, seed=seed)
    return generate_tokens(model, [[3, 1, 4, 1, 5, 9, 2, 6]], params)[0]


@needs_kernel
@pytest.mark.parametrize("n,temperature,seed", [(1, 0.0, None), (3, 1.0, 7)])
def test_generation_with_the_kernel_equals_the_pytorch_path(n, temperature, seed, request):
    model = tiny()
    with_kernel = run(model, n, temperature, seed)
    request.getfixturevalue("kernel_off")
    assert not cpu_decode.available()
    without = run(model, n, temperature, seed)
    for a, b in zip(with_kernel, without):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4)


@needs_engine_kernel
def test_mixed_length_prompts_and_a_continuous_batch_give_the_pytorch_paths_tokens(request, monkeypatch):
    from palm_rlhf import DecodeSession

    rows_seen = []
    real = cpu_decode.attn_swiglu_unchecked

    def spy(fused, *a, **k):
        rows_seen.append(fused.shape[0])
        return real(fused, *a, **k)

    monkeypatch.setattr(cpu_decode, "attn_swiglu_unchecked", spy)
    model = tiny()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1]]
    params = SamplingParams(max_new_tokens=12, temperature=0)

    def session_run():
        session, out = DecodeSession(model), {}
        session.add([prompts[0]], params, tag=0)
        step = 0
        while session:
            if step in (2, 5):  # later prompts join a running, left-padded batch
                session.add([prompts[1 if step == 2 else 2]], params, tag=1 if step == 2 else 2)
            for ev in session.step():
                out.setdefault(ev.row.tag, []).append((ev.token, ev.logprob))
            step += 1
        return out

    batched = generate_tokens(model, prompts, params)
    assert max(rows_seen) == 3  # the left-padded batch of three prompt lengths ran in the kernel
    rows_seen.clear()
    joined = session_run()
    assert max(rows_seen) == 3  # and so did the session once the later prompts had joined
    request.getfixturevalue("kernel_off")
    want_batched, want_joined = generate_tokens(model, prompts, params), session_run()
    for a, b in zip(batched, want_batched):
        assert a[0].token_ids == b[0].token_ids
        torch.testing.assert_close(torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), rtol=1e-4, atol=1e-4)
    for tag in want_joined:
        assert [t for t, _ in joined[tag]] == [t for t, _ in want_joined[tag]]
        torch.testing.assert_close(
            torch.tensor([lp for _, lp in joined[tag]]), torch.tensor([lp for _, lp in want_joined[tag]]),
            rtol=1e-4, atol=1e-4,
        )


@needs_engine_kernel
def test_bfloat16_decoding_with_the_kernel_stays_close_to_the_pytorch_path(request):
    model = tiny(torch.bfloat16)
    with_kernel = run(model)[0]
    request.getfixturevalue("kernel_off")
    without = run(model)[0]
    # bfloat16 rounds at different places on the two paths: compare the first steps' log-probs
    same = 0
    for a, b in zip(with_kernel.token_ids, without.token_ids):
        if a != b:
            break
        same += 1
    assert same >= 4
    torch.testing.assert_close(
        torch.tensor(with_kernel.logprobs[:same]), torch.tensor(without.logprobs[:same]), rtol=0.05, atol=0.05
    )


@needs_engine_kernel
def test_the_engine_runs_the_kernel_for_one_prompt_for_padded_batches_and_with_lora(monkeypatch, request):
    calls = []
    real = cpu_decode.attn_swiglu_unchecked
    monkeypatch.setattr(cpu_decode, "attn_swiglu_unchecked", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny()
    generate_tokens(model, [[1, 2, 3]], SamplingParams(max_new_tokens=5, temperature=0, n=2))
    assert len(calls) == 4 * model.config.depth  # every decode step after the prefill, every layer
    calls.clear()
    generate_tokens(model, [[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=5, temperature=0))
    assert len(calls) == 4 * model.config.depth  # left-padded rows: per-row first slots and positions
    calls.clear()
    model.add_finetune_params("actor", lora_r=2)
    for p in model.finetune_parameters("actor"):
        torch.nn.init.normal_(p, std=0.2)  # an adapter that changes the answer
    sp = SamplingParams(max_new_tokens=8, temperature=0)
    tuned = generate_tokens(model, [[1, 2, 3]], sp, finetune_scope="actor")[0][0]
    assert len(calls) == 7 * model.config.depth  # LoRA adapters: merged into the runner's weights
    base = generate_tokens(model, [[1, 2, 3]], sp)[0][0]
    request.getfixturevalue("kernel_off")
    want = generate_tokens(model, [[1, 2, 3]], sp, finetune_scope="actor")[0][0]
    assert tuned.token_ids == want.token_ids
    torch.testing.assert_close(torch.tensor(tuned.logprobs), torch.tensor(want.logprobs), rtol=1e-4, atol=1e-4)
    assert tuned.logprobs != base.logprobs


def test_a_failed_build_leaves_the_kernel_off_and_the_model_working(monkeypatch, use_settings, tmp_path, caplog):
    model = tiny()
    expected = run(model)[0].token_ids
    # a compiler that always fails
    use_settings(compiler="false", cache_dir=tmp_path)
    monkeypatch.setattr(cpu_decode, "PREBUILT", tmp_path / "none.so")
    cpu_decode.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="kernels.cpu_decode"):
            assert not cpu_decode.available()
        assert "CPU decode kernel unavailable" in caplog.text
        with pytest.raises(RuntimeError, match="compiling"):
            cpu_decode.build()
        assert run(model)[0].token_ids == expected
        assert not list(tmp_path.glob("*.so"))  # no half-written library left behind
    finally:
        monkeypatch.undo()
        cpu_decode.reset()


@needs_kernel
def test_the_build_is_cached_and_reused(use_settings, tmp_path):
    use_settings(cache_dir=tmp_path)
    first = cpu_decode.build()
    stamp = first.stat().st_mtime_ns
    second = cpu_decode.build()
    assert first == second and second.stat().st_mtime_ns == stamp
    assert first.parent == tmp_path and first.name.startswith("cpu_decode-")
    assert cpu_decode.build(force=True) == first
    assert os.access(first, os.R_OK)


@pytest.mark.skipif(cpu_decode._compiler() is None, reason="no C compiler here")
def test_the_kernel_builds_and_passes_its_self_check_where_a_compiler_exists():
    """A broken kernel turns itself off for users (and the tests above would then skip): here
    it must be on."""
    assert cpu_decode.available()


@needs_kernel
def test_a_portable_prebuilt_library_is_used_where_nothing_compiles(monkeypatch, use_settings, tmp_path):
    prebuilt = cpu_decode.build(portable=True, output=tmp_path / "cpu_decode-portable.so")
    monkeypatch.setattr(cpu_decode, "PREBUILT", prebuilt)
    use_settings(compiler="false", cache_dir=tmp_path / "cache")
    cpu_decode.reset()
    try:
        assert cpu_decode.available()
        fused, cos, sin, k, v = inputs(1, 2, 16, 8, 20, torch.float32)
        k_ref, v_ref = k.clone(), v.clone()
        want = cpu_decode.reference(fused, cos, sin, k_ref, v_ref, 6, 2, 8, 0.3)
        torch.testing.assert_close(cpu_decode.attn_swiglu(fused, cos, sin, k, v, 6, 2, 8, 0.3), want)
    finally:
        monkeypatch.undo()
        cpu_decode.reset()


@needs_kernel
def test_the_checked_entry_point_refuses_what_would_write_out_of_bounds():
    fused, cos, sin, k, v = inputs(2, 2, 16, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="slot 20"):
        cpu_decode.attn_swiglu(fused, cos, sin, k, v, 20, 2, 8, 0.3)  # the caches hold slots 0-19
    with pytest.raises(ValueError, match="fused rows"):
        cpu_decode.attn_swiglu(fused[:, :-1], cos, sin, k, v, 5, 2, 8, 0.3)
    with pytest.raises(ValueError, match="caches must be"):
        cpu_decode.attn_swiglu(fused, cos, sin, k[:1], v[:1], 5, 2, 8, 0.3)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_decode.attn_swiglu(fused, cos, sin, k.bfloat16(), v.bfloat16(), 5, 2, 8, 0.3)
    assert not cpu_decode.supports(fused, [(k, v)], 20)


@needs_kernel
def test_the_self_check_covers_every_vectorised_head_dim_and_catches_a_wrong_one(monkeypatch):
    lib = cpu_decode.library()
    assert {32, 64, 128} <= set(cpu_decode.SELF_CHECK_HEAD_DIMS)
    assert cpu_decode._self_check(lib)
    real = cpu_decode._call

    def wrong_at_64(lib, fused, cos, sin, k_cache, v_cache, *args):  # a broken vector path at d = 64
        out = real(lib, fused, cos, sin, k_cache, v_cache, *args)
        return out + 1e-2 if k_cache.shape[-1] == 64 else out

    monkeypatch.setattr(cpu_decode, "_call", wrong_at_64)
    assert not cpu_decode._self_check(lib)


@needs_kernel
def test_a_cache_with_several_kv_heads_is_left_to_pytorch():
    fused, _cos, _sin, k, v = inputs(2, 2, 16, 8, 20, torch.float32)
    assert cpu_decode.supports(fused, [(k, v)], 5)
    k2, v2 = k.expand(2, 2, 20, 16).contiguous(), v.expand(2, 2, 20, 16).contiguous()
    assert not cpu_decode.supports(fused, [(k2, v2)], 5)


@needs_kernel
def test_the_prebuilt_library_is_used_when_the_cache_directory_cannot_be_written(monkeypatch, tmp_path):
    prebuilt = cpu_decode.build(portable=True, output=tmp_path / "cpu_decode-portable.so")
    monkeypatch.setattr(cpu_decode, "PREBUILT", prebuilt)

    def unwritable(*a, **kw):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro-cache"))

    monkeypatch.setattr(cpu_decode, "build", unwritable)
    cpu_decode.reset()
    try:
        assert cpu_decode.available()
    finally:
        monkeypatch.undo()
        cpu_decode.reset()
