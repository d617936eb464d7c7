"""The CPU fast paths: oneDNN-reordered weights for inference matmuls (each op probed and
checked per dtype), and the CPU decode runner (palm_rlhf/cpu_decode_runner.py), which must give
the general path's answer (ParallelBlock.forward with a cache), follow the weights when they
change, and be what the engine runs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_decode
from palm_rlhf import PaLM, SamplingParams, cpu_decode_runner, cpu_linear, generate_tokens
from palm_rlhf.generation import KVCache

needs_packing = pytest.mark.skipif(
    not cpu_linear.enabled(torch.float32), reason="oneDNN weight reordering is not available here for float32"
)
needs_kernel = pytest.mark.skipif(not cpu_decode.available(), reason="the CPU decode kernel could not be built here")


def tiny(**kw) -> PaLM:
    torch.manual_seed(0)
    base = {"num_tokens": 64, "dim": 48, "depth": 2, "dim_head": 16, "heads": 3}
    base.update(kw)
    return PaLM(**base).eval()


@pytest.fixture
def fresh_packing(monkeypatch):
    """Each dtype's oneDNN enablement decided afresh inside the test, and again afterwards."""
    monkeypatch.setattr(cpu_linear, "_enabled", {})
    monkeypatch.setattr(cpu_linear, "_forced_off", False)
    yield
    cpu_linear.clear()


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["output-major", "input-major"])
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 33, 300])
def test_packed_linear_equals_f_linear(rows, layout, dtype):
    if not cpu_linear.enabled(dtype):
        pytest.skip(f"oneDNN weight reordering failed its check for {dtype} here")
    torch.manual_seed(rows)
    w = torch.randn(70, 48)
    if layout == "input-major":  # the layout of the fused projection in float32
        w = w.t().contiguous().t()
    w, x = w.to(dtype), torch.randn(2, rows, 48).to(dtype)
    with torch.no_grad():
        got = cpu_linear.linear(x, w)
    assert got.shape == (2, rows, 70) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), rtol=tol, atol=tol * 5)
    assert id(w) in cpu_linear._packs  # it did take the reordered path


@needs_packing
@pytest.mark.parametrize("rows", [1, 4])
def test_linear_add_equals_residual_plus_linear_and_leaves_the_residual_alone(rows):
    torch.manual_seed(0)
    w, x, r = torch.randn(40, 24), torch.randn(rows, 24), torch.randn(rows, 40)
    keep = r.clone()
    with torch.no_grad():
        got = cpu_linear.linear_add(x, w, r)
    torch.testing.assert_close(got, keep + F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, keep, rtol=0, atol=0)


@pytest.mark.usefixtures("fresh_packing")
def test_a_failing_self_check_turns_the_reordered_path_off(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_apply", lambda x2, packed: torch.zeros(x2.shape[0], packed.shape[0]))
    assert not cpu_linear.enabled(torch.float32)
    w, x = torch.randn(30, 20), torch.randn(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(cpu_linear.linear(x, w), F.linear(x, w))  # F.linear, not the broken path
    assert id(w) not in cpu_linear._packs


@needs_packing
@pytest.mark.usefixtures("fresh_packing")
def test_a_failing_residual_op_turns_the_reordered_path_off(monkeypatch):
    """_linear_pointwise.binary (the decode step's output projection) is checked too."""
    real = cpu_linear._apply_add
    monkeypatch.setattr(cpu_linear, "_apply_add", lambda x2, packed, r: real(x2, packed, r) * 2)
    assert not cpu_linear.enabled(torch.float32)


@needs_packing
@pytest.mark.usefixtures("fresh_packing")
def test_a_dtype_that_fails_its_check_leaves_the_other_dtypes_on(monkeypatch):
    """Enablement is per dtype: bfloat16 failing (as on CPUs without native bfloat16) keeps
    float32 on oneDNN."""
    real = cpu_linear._apply

    def broken_in_bfloat16(x2, packed):
        out = real(x2, packed)
        return out * 2 if x2.dtype == torch.bfloat16 else out

    monkeypatch.setattr(cpu_linear, "_apply", broken_in_bfloat16)
    assert not cpu_linear.enabled(torch.bfloat16)
    assert cpu_linear.enabled(torch.float32)
    w32, x32 = torch.randn(30, 20), torch.randn(3, 20)
    w16, x16 = w32.bfloat16(), x32.bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(cpu_linear.linear(x32, w32), F.linear(x32, w32), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cpu_linear.linear(x16, w16), F.linear(x16, w16), rtol=0, atol=0)
    assert id(w32) in cpu_linear._packs and id(w16) not in cpu_linear._packs


@pytest.mark.usefixtures("fresh_packing")
def test_set_enabled_turns_every_dtype_off_and_back_on():
    cpu_linear.set_enabled(False)
    assert not cpu_linear.enabled(torch.float32) and not cpu_linear.enabled(torch.bfloat16)
    cpu_linear.set_enabled(True)
    assert cpu_linear.enabled(torch.float32) == (cpu_linear._ops_available() and cpu_linear._self_check(torch.float32))


@needs_packing
def test_packed_weight_follows_in_place_updates():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(30, 20))
    x = torch.randn(4, 20)
    with torch.no_grad():
        before = cpu_linear.linear(x, w)
        w.mul_(-2.0)  # an optimizer step or a load_state_dict: in place, bumps the version
        after = cpu_linear.linear(x, w)
    torch.testing.assert_close(after, -2.0 * before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, F.linear(x, w.detach()), rtol=1e-5, atol=1e-5)


def test_linear_keeps_autograd_when_gradients_are_needed():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(30, 20))
    x = torch.randn(4, 20)
    cpu_linear.linear(x, w).sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(30, 20), rtol=1e-5, atol=1e-5)


def test_layout_survives_dtype_moves_and_copies_and_state_dicts_stay_contiguous():
    model = tiny()
    w = model.layers[0].fused_attn_ff_proj.weight
    assert w.stride() == (1, w.shape[0])  # float32 on the CPU: input-major
    model.to(torch.bfloat16).to(torch.float32)
    assert model.layers[0].fused_attn_ff_proj.weight.stride() == (1, w.shape[0])
    clone = copy.deepcopy(model)
    assert clone.layers[0].fused_attn_ff_proj.weight.stride() == (1, w.shape[0])
    x = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    assert all(t.is_contiguous() for t in model.state_dict().values())


# --- the CPU decode runner --------------------------------------------------------------------


def prefilled(model, batch, prefix_len=9, slots=16, scope=None, seed=1):
    """Two identical KV caches holding a random prefix, the prefix and one next token."""
    torch.manual_seed(seed)
    cfg = model.config
    prefix = torch.randint(0, cfg.num_tokens, (batch, prefix_len))
    positions = torch.arange(prefix_len)[None].expand(batch, prefix_len)
    caches = [KVCache(cfg.depth, batch, slots, cfg.dim_head, torch.device("cpu"), model.dtype) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model.forward_cached(prefix, positions, cache.layers(), 0, finetune_scope=scope)
    return caches, torch.randint(0, cfg.num_tokens, (batch,))


def both_paths(model, batch, scope=None, **kw):
    """(runner logits, general-path logits, the two caches) for one decode step at slot 9."""
    caches, tok = prefilled(model, batch, scope=scope, **kw)
    pos = torch.full((1, 1), 9)
    runner = cpu_decode_runner.runner_for(model, tok[:, None], caches[0].layers(), 9, finetune_scope=scope)
    assert runner is not None, "the fast path did not apply"
    before = runner.steps
    fast = runner.step(tok, pos, caches[0].layers(), 9)
    assert runner.steps == before + 1
    with torch.no_grad():
        general = model.forward_cached(tok[:, None], pos, caches[1].layers(), 9, finetune_scope=scope)
    return fast, general, caches


@needs_kernel
@pytest.mark.parametrize("batch", [1, 3])
def test_the_runner_equals_the_general_cached_layer(batch):
    """One decode step through the runner (packed weights, the C kernel) against
    ParallelBlock.forward with a cache: the logits and every cache slot written."""
    model = tiny()
    fast, general, caches = both_paths(model, batch)
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)
    for (k0, v0), (k1, v1) in zip(caches[0].layers(), caches[1].layers()):
        torch.testing.assert_close(k0, k1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v0, v1, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_the_runner_with_merged_lora_equals_the_general_path_with_adapters():
    model = tiny()
    model.add_finetune_params("actor", lora_r=4)
    for p in model.finetune_parameters("actor"):
        torch.nn.init.normal_(p, std=0.2)
    fast, general, _ = both_paths(model, 2, scope="actor")
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)
    base, _, _ = both_paths(model, 2)
    assert not torch.allclose(fast, base, atol=1e-3)  # the adapter does change the answer


@pytest.mark.parametrize("kw", [{"qk_rmsnorm": True}, {"rotary_xpos": True}])
def test_options_the_runner_does_not_cover_take_the_general_path(kw):
    model = tiny(**kw)
    caches, tok = prefilled(model, 2)
    assert cpu_decode_runner.runner_for(model, tok[:, None], caches[0].layers(), 9) is None
    model.train()
    model.set_dropout(0.1)
    assert cpu_decode_runner.runner_for(model, tok[:, None], caches[0].layers(), 9) is None


@needs_kernel
@pytest.mark.parametrize("change", ["optimizer step", "load_state_dict", "dtype round trip", "merge lora"])
def test_the_runner_is_rebuilt_when_the_weights_change(change):
    model = tiny()
    caches, tok = prefilled(model, 1)
    first = cpu_decode_runner.runner_for(model, tok[:, None], caches[0].layers(), 9)
    assert first.is_current()
    if change == "optimizer step":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(torch.randint(0, 64, (2, 7)), return_loss=True).backward()
        opt.step()
    elif change == "load_state_dict":
        other = tiny()
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.5)
        model.load_state_dict(other.state_dict())
    elif change == "dtype round trip":
        model.to(torch.bfloat16).to(torch.float32)
    else:
        model.add_finetune_params("actor", lora_r=2)
        for p in model.finetune_parameters("actor"):
            torch.nn.init.normal_(p, std=0.2)
        model.merge_finetune_params("actor")
    assert not first.is_current()
    fast, general, _ = both_paths(model, 1)
    assert cpu_decode_runner.cached_runners(model)[None] is not first
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_engine_runs_the_runner_and_gives_the_general_paths_tokens(monkeypatch):
    model = tiny()
    sp = SamplingParams(max_new_tokens=10, temperature=0)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    steps = []
    real = cpu_decode_runner.CPUDecodeRunner.step
    monkeypatch.setattr(cpu_decode_runner.CPUDecodeRunner, "step", lambda self, *a: steps.append(1) or real(self, *a))
    fast = generate_tokens(model, prompts, sp)
    assert len(steps) == 9  # every decode step after the prefill
    monkeypatch.setattr(cpu_decode_runner, "applies", lambda *a, **k: False)
    general = generate_tokens(model, prompts, sp)
    assert len(steps) == 9
    for a, b in zip(fast, general):
        assert a[0].token_ids == b[0].token_ids
        torch.testing.assert_close(torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), rtol=1e-5, atol=1e-5)


@needs_packing
@needs_kernel
def test_a_decode_step_reads_the_reordered_weights():
    """The runner's step reads reordered copies of every projection, the tied output
    embedding included; the fused input projection's copy is the general path's own."""
    model = tiny()
    cpu_linear.clear()
    caches, tok = prefilled(model, 1)
    runner = cpu_decode_runner.runner_for(model, tok[:, None], caches[0].layers(), 9)
    runner.step(tok, torch.full((1, 1), 9), caches[0].layers(), 9)
    packed = set(cpu_linear._packs)
    assert id(model.token_emb.weight) in packed
    for i, layer in enumerate(model.layers):
        assert id(layer.fused_attn_ff_proj.weight) in packed
        assert runner.weights(1)[i].fused_w is cpu_linear._packs[id(layer.fused_attn_ff_proj.weight)][2]
        merged = runner.merged_out_weight(i)
        assert merged.is_mkldnn and merged.shape == (48, layer.attn_inner + layer.ff_inner)
