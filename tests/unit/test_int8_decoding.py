"""Weight-only int8 decoding on the CPU: the quantizer, the int8 GEMV, and the decode step (the
CPU decode runner) reading int8 copies that follow the float weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from palm_rlhf import PaLM, SamplingParams, cpu_decode_runner, cpu_linear, generate_tokens
from palm_rlhf.generation import KVCache

pytestmark = pytest.mark.skipif(not cpu_linear.int8_available(), reason="no torch._weight_int8pack_mm here")


def tiny() -> PaLM:
    torch.manual_seed(0)
    return PaLM(num_tokens=64, dim=48, depth=2, dim_head=16, heads=3).eval()


def runner(model: PaLM) -> cpu_decode_runner.CPUDecodeRunner:
    """The runner a one-row decode step of ``model`` gets now."""
    cfg = model.config
    cache = KVCache(cfg.depth, 1, 4, cfg.dim_head, torch.device("cpu"), model.dtype)
    out = cpu_decode_runner.runner_for(model, torch.zeros(1, 1, dtype=torch.long), cache.layers(), 0)
    assert out is not None, "int8 decoding did not take the CPU decode runner"
    return out


def dequantized(model: PaLM) -> PaLM:
    """A float copy whose projection weights are exactly the int8 copies times their scales."""
    deq = copy.deepcopy(model).quantize_int8(False)
    int8 = runner(model)
    with torch.no_grad():
        for i, layer in enumerate(deq.layers):
            (fq, fs), (oq, os_) = int8.int8_weights(i)
            layer.fused_attn_ff_proj.weight.copy_(fq.float() * fs.float()[:, None])
            out = oq.float() * os_.float()[:, None]
            layer.attn_out.weight.copy_(out[:, : layer.attn_inner])
            layer.ff_out.weight.copy_(out[:, layer.attn_inner :])
    return deq


def test_quantize_int8_rounds_each_weight_to_its_channel_grid():
    torch.manual_seed(0)
    w = torch.randn(40, 24) * torch.linspace(0.01, 3, 40)[:, None]  # very different row ranges
    wq, scale = cpu_linear.quantize_int8(w)
    assert wq.dtype == torch.int8 and scale.shape == (40,)
    assert int(wq.abs().max()) == 127  # every row uses its full range
    err = (wq.float() * scale.float()[:, None] - w).abs()
    # half a step of the grid, plus the bfloat16 rounding of the scale itself (2^-8 relative)
    bound = scale.float()[:, None] / 2 + w.abs() * 2**-8
    assert bool((err <= bound).all())


@pytest.mark.parametrize("rows", [1, 3])
def test_int8_linear_equals_the_dequantized_float_product(rows):
    torch.manual_seed(rows)
    w, x = torch.randn(70, 48), torch.randn(rows, 48)
    wq, scale = cpu_linear.quantize_int8(w)
    got = cpu_linear.int8_linear(x, wq, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, 70)
    want = F.linear(x.bfloat16().float(), wq.float() * scale.float()[:, None])
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert (got - F.linear(x, w)).abs().max() < 0.05 * F.linear(x, w).abs().max()


def test_decoding_reads_the_int8_weights():
    model = tiny()
    prompt = torch.randint(0, 64, (10,)).tolist()
    sp = SamplingParams(max_new_tokens=12, temperature=0)
    float_run = generate_tokens(model, [prompt], sp)[0][0]
    model.quantize_int8()
    assert model.int8_decoding
    int8_runner = runner(model)
    steps = int8_runner.steps
    int8_run = generate_tokens(model, [prompt], sp)[0][0]
    assert int8_runner.steps == steps + 11  # every decode step read the int8 weights
    deq_run = generate_tokens(dequantized(model), [prompt], sp)[0][0]
    # the first token comes from the (float) prefill; the rest from int8 decode steps, which
    # match a float model holding the dequantized weights, not the original float model
    assert int8_run.logprobs[0] == float_run.logprobs[0]
    assert int8_run.token_ids == deq_run.token_ids
    diff_deq = max(abs(a - b) for a, b in zip(int8_run.logprobs[1:], deq_run.logprobs[1:]))
    diff_float = max(abs(a - b) for a, b in zip(int8_run.logprobs[1:], float_run.logprobs[1:]))
    assert diff_deq < 5e-3 and diff_float > 0
    model.quantize_int8(False)
    assert generate_tokens(model, [prompt], sp)[0][0].logprobs == float_run.logprobs


def test_int8_copies_follow_in_place_weight_updates():
    model = tiny().quantize_int8()
    layer = model.layers[0]
    (_, s0), (_, o0) = runner(model).int8_weights(0)
    with torch.no_grad():
        layer.fused_attn_ff_proj.weight.mul_(2.0)  # an optimizer step: in place
    (_, s1), (_, o1) = runner(model).int8_weights(0)
    torch.testing.assert_close(s1.float(), 2 * s0.float(), rtol=1e-2, atol=0)
    torch.testing.assert_close(o1, o0)


def test_larger_batches_keep_the_float_weights():
    model = tiny()
    prompt = torch.randint(0, 64, (6,)).tolist()
    sp = SamplingParams(max_new_tokens=6, temperature=0, n=cpu_linear.INT8_MAX_ROWS + 1)
    before = generate_tokens(model, [prompt], sp)[0]
    after = generate_tokens(model.quantize_int8(), [prompt], sp)[0]
    assert [c.logprobs for c in after] == [c.logprobs for c in before]


def test_int8_is_refused_off_the_cpu():
    with torch.device("meta"):
        model = PaLM(num_tokens=64, dim=48, depth=1, dim_head=16, heads=3)
    with pytest.raises(ValueError, match="CPU path"):
        model.quantize_int8()


def test_inner_sizes_the_kernel_cannot_take_are_refused():
    wq, scale = cpu_linear.quantize_int8(torch.randn(8, 24))
    with pytest.raises(ValueError, match="divisible by 16"):
        cpu_linear.int8_linear(torch.randn(1, 24), wq, scale)
    torch.manual_seed(0)
    odd = PaLM(num_tokens=64, dim=40, depth=1, dim_head=8, heads=2)
    with pytest.raises(ValueError, match="divisible by 16"):
        odd.quantize_int8()


def test_int8_decoding_without_the_c_kernel_matches_the_dequantized_model():
    """Where the C kernel is off, the runner's PyTorch middle still serves int8 steps."""
    from kernels import cpu_decode, settings

    model = tiny().quantize_int8()
    prompt = torch.randint(0, 64, (7,)).tolist()
    sp = SamplingParams(max_new_tokens=8, temperature=0)
    want = generate_tokens(dequantized(model), [prompt], sp)[0][0]
    with settings.override(cpu_kernel=False):
        cpu_decode.reset()
        try:
            assert not cpu_decode.available()
            int8_runner = runner(model)
            steps = int8_runner.steps
            got = generate_tokens(model, [prompt], sp)[0][0]
        finally:
            cpu_decode.reset()
    assert int8_runner.steps == steps + 7
    assert got.token_ids == want.token_ids
    diff = max(abs(a - b) for a, b in zip(got.logprobs[1:], want.logprobs[1:]))
    assert diff < 5e-3
