"""A whole PaLM forward and backward with the Triton kernels against the PyTorch path."""

from __future__ import annotations

import pytest
import torch
from _kernel_testing import DEVICE, max_rel_err

from kernels import attention as attention_module
from kernels import dispatch
from kernels import swiglu as swiglu_module

palm_rlhf = pytest.importorskip("palm_rlhf")


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls = [0]
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor, backend: str):
    model.zero_grad(set_to_none=True)
    with dispatch.use_backend(backend):
        loss = model(tokens, return_loss=True)
        loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("heads,dim_head", [(4, 32), (2, 64)])
def test_palm_forward_backward_with_and_without_kernels(
    monkeypatch: pytest.MonkeyPatch, heads: int, dim_head: int
) -> None:
    torch.manual_seed(0)
    model = palm_rlhf.PaLM(num_tokens=97, dim=64, depth=2, dim_head=dim_head, heads=heads).to(DEVICE)
    tokens = torch.randint(1, 97, (2, 30), device=DEVICE)  # 29 positions after the next-token shift

    ref_loss, ref_grads = _loss_and_grads(model, tokens, "torch")

    attn_calls = _count_calls(monkeypatch, attention_module, "triton_attention")
    swiglu_calls = _count_calls(monkeypatch, swiglu_module, "triton_swiglu")
    loss, grads = _loss_and_grads(model, tokens, "triton")
    # depth 2: at least one attention and one SwiGLU per layer went through the kernels
    assert attn_calls[0] >= 2 and swiglu_calls[0] >= 2, "the model did not run through the kernels"

    assert torch.isfinite(loss)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        err = max_rel_err(grad, ref_grads[name])
        assert err <= 1e-4, f"grad of {name}: relative error {err:.2e}"


def test_palm_inference_logits_match() -> None:
    torch.manual_seed(1)
    model = palm_rlhf.PaLM(num_tokens=97, dim=64, depth=2, dim_head=32, heads=4).to(DEVICE).eval()
    tokens = torch.randint(1, 97, (3, 21), device=DEVICE)
    with torch.no_grad():
        with dispatch.use_backend("torch"):
            ref = model(tokens)
        with dispatch.use_backend("triton"):
            out = model(tokens)
    assert max_rel_err(out, ref) <= 1e-5


def test_cached_generation_uses_the_decode_kernel_and_matches_pytorch(monkeypatch):
    """Sampling with the KV cache: prefill through the fused kernel, every new token through
    the decode kernel, and the same tokens and log-probs as the PyTorch path."""
    import kernels.attention as ka
    from kernels import dispatch
    from palm_rlhf import PaLM, SamplingParams, generate_tokens

    torch.manual_seed(0)
    model = PaLM(num_tokens=40, dim=32, depth=2, dim_head=32, heads=2).eval()
    params = SamplingParams(max_new_tokens=5, temperature=0)
    dispatch.set_backend("torch")
    expected = generate_tokens(model, [[1, 2, 3, 4]], params)[0][0]

    calls = {"decode": 0, "prefill": 0}
    decode, prefill = ka.triton_decode_attention, ka.triton_attention

    def counted_decode(*a, **k):
        calls["decode"] += 1
        return decode(*a, **k)

    def counted_prefill(*a, **k):
        calls["prefill"] += 1
        return prefill(*a, **k)

    monkeypatch.setattr(ka, "triton_decode_attention", counted_decode)
    monkeypatch.setattr(ka, "triton_attention", counted_prefill)
    dispatch.set_backend("triton")
    got = generate_tokens(model, [[1, 2, 3, 4]], params)[0][0]
    assert calls == {"decode": 4 * 2, "prefill": 2}  # 4 decode steps x 2 layers; one prefill per layer
    assert got.token_ids == expected.token_ids
    assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
