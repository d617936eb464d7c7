"""The CPU fast paths: oneDNN-reordered weights for inference matmuls, the shared buffer of the
two output projections, and the one-token decode step. Each must give the plain computation's
answer, and follow the weights when they change."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from palm_rlhf import PaLM, cpu_linear
from palm_rlhf.generation import KVCache

needs_packing = pytest.mark.skipif(not cpu_linear.enabled(), reason="oneDNN weight reordering is not available here")


def tiny(**kw) -> PaLM:
    torch.manual_seed(0)
    base = {"num_tokens": 64, "dim": 48, "depth": 2, "dim_head": 16, "heads": 3}
    base.update(kw)
    return PaLM(**base).eval()


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["output-major", "input-major"])
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 33, 300])
def test_packed_linear_equals_f_linear(rows, layout, dtype):
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


def test_a_failing_self_check_turns_the_reordered_path_off(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_apply", lambda x2, packed: torch.zeros(x2.shape[0], packed.shape[0]))
    monkeypatch.setattr(cpu_linear, "_enabled", None)
    monkeypatch.delenv("PALM_RLHF_CPU_PACKED", raising=False)
    assert not cpu_linear.enabled()
    w, x = torch.randn(30, 20), torch.randn(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(cpu_linear.linear(x, w), F.linear(x, w))  # F.linear, not the broken path


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


def test_output_projections_share_one_buffer_on_cpu_and_survive_dtype_moves():
    model = tiny()
    for layer in model.layers:
        merged = layer.merged_out_weight()
        assert merged is not None
        torch.testing.assert_close(merged, torch.cat((layer.attn_out.weight, layer.ff_out.weight), dim=1))
    model.to(torch.bfloat16).to(torch.float32)
    assert all(layer.merged_out_weight() is not None for layer in model.layers)
    # a deep copy keeps the sharing (storages are copied once), and state dicts stay contiguous
    clone = copy.deepcopy(model)
    assert all(layer.merged_out_weight() is not None for layer in clone.layers)
    assert all(t.is_contiguous() for t in model.state_dict().values())


def test_merged_view_follows_an_optimizer_step():
    model = tiny()
    layer = model.layers[0]
    layer.merged_out_weight()  # cache the view
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randint(0, 64, (2, 7)), return_loss=True).backward()
    opt.step()
    torch.testing.assert_close(
        layer.merged_out_weight(), torch.cat((layer.attn_out.weight, layer.ff_out.weight), dim=1).detach()
    )


@pytest.mark.parametrize("kw", [{}, {"qk_rmsnorm": True}, {"rotary_xpos": True}])
@pytest.mark.parametrize("batch", [1, 3])
def test_one_token_decode_equals_the_general_cached_layer(kw, batch):
    """decode_one (the engine's path for one new token) against ParallelBlock.forward with a
    cache, layer by layer, at a position well inside the cache."""
    model = tiny(**kw)
    torch.manual_seed(1)
    cfg = model.config
    prefix = torch.randint(0, 64, (batch, 9))
    positions = torch.arange(10)[None].expand(batch, 10)
    with torch.no_grad():
        caches = [KVCache(cfg.depth, batch, 16, cfg.dim_head, torch.device("cpu"), torch.float32) for _ in range(2)]
        for cache in caches:
            model.forward_cached(prefix, positions[:, :9], cache.layers(), 0)
        tok = torch.randint(0, 64, (batch, 1))
        fast = model.forward_cached(tok, positions[:, 9:], caches[0].layers(), 9)
        h = model.token_emb(tok)
        rotary = model.rotary.lookup(positions[:, 9:], h.dtype)
        for layer, cache in zip(model.layers, caches[1].layers()):
            h = layer(h, rotary, cache=cache, cache_pos=9)
        slow = model.norm(h[:, -1]) @ model.token_emb.weight.t()
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    for (k0, v0), (k1, v1) in zip(caches[0].layers(), caches[1].layers()):
        torch.testing.assert_close(k0, k1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v0, v1, rtol=1e-5, atol=1e-6)


def test_one_token_decode_with_lora_equals_the_full_forward():
    model = tiny()
    model.add_finetune_params("actor", lora_r=4)
    for p in model.finetune_parameters("actor"):
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        full = model(x, finetune_scope="actor")[:, -1]
        cache = KVCache(model.config.depth, 2, 8, model.config.dim_head, torch.device("cpu"), torch.float32)
        model.forward_cached(x[:, :-1], torch.arange(7)[None].expand(2, 7), cache.layers(), 0, finetune_scope="actor")
        last = model.forward_cached(x[:, -1:], torch.full((2, 1), 7), cache.layers(), 7, finetune_scope="actor")
        plain = model(x)[:, -1]
    torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full, plain, atol=1e-3)  # the adapter does change the answer


@needs_packing
def test_a_decode_step_reads_the_reordered_weights():
    """One new token goes through the reordered copies of every projection, including the
    tied output embedding, and gives the general cached layer's answer."""
    model = tiny()
    cpu_linear.clear()
    cache = KVCache(model.config.depth, 1, 8, model.config.dim_head, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        model.forward_cached(torch.randint(0, 64, (1, 5)), torch.arange(5)[None], cache.layers(), 0)
        model.forward_cached(torch.randint(0, 64, (1, 1)), torch.full((1, 1), 5), cache.layers(), 5)
    packed = set(cpu_linear._packs)
    assert id(model.token_emb.weight) in packed
    for layer in model.layers:
        assert id(layer.fused_attn_ff_proj.weight) in packed and id(layer.merged_out_weight()) in packed
