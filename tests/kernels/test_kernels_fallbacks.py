"""The fallback counter: counted by reason, logged once per reason, exported to Prometheus."""

from __future__ import annotations

import logging

import pytest
import torch
from _kernel_testing import DEVICE

from kernels import dispatch, fallbacks


@pytest.fixture(autouse=True)
def _fresh_counter():
    fallbacks.reset()
    yield
    fallbacks.reset()


def test_each_reason_is_logged_once_and_counted_every_time(caplog):
    x = torch.randn(4, 6, device=DEVICE, dtype=torch.float64)  # float64: no kernel
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    kv = torch.randn(1, 1, 8, 16, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="kernels.fallbacks"), dispatch.use_backend("triton"):
        for _ in range(3):
            dispatch.swiglu(x)
        dispatch.attention(q, kv, kv, dropout_p=0.1)
        wide = torch.randn(1, 1, 8, 160, device=DEVICE)
        dispatch.attention(wide, wide, wide)  # head dim above 128
    assert fallbacks.snapshot() == {
        ("swiglu", "dtype"): 3,
        ("attention", "dropout"): 1,
        ("attention", "head_dim"): 1,
    }
    assert fallbacks.total() == 5
    logged = [r.getMessage() for r in caplog.records if r.name == "kernels.fallbacks"]
    assert len(logged) == 3 and sum("swiglu" in m for m in logged) == 1


def test_decode_fallbacks_are_counted():
    q = torch.randn(2, 2, 1, 16, device=DEVICE, requires_grad=True)
    cache = torch.randn(2, 1, 9, 16, device=DEVICE)
    wide = torch.randn(2, 1, 9, 160, device=DEVICE)
    with dispatch.use_backend("triton"):
        dispatch.decode_attention(q, cache, cache, 9)  # needs gradients
        with torch.no_grad():
            dispatch.decode_attention(wide[:, :, :1], wide, wide, 9)
            dispatch.decode_attention(q, cache, cache, 9)  # on the kernel: not counted
    assert fallbacks.snapshot() == {("decode_attention", "needs_grad"): 1, ("decode_attention", "head_dim"): 1}


def test_prometheus_counter_reads_the_process_counter():
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    from services.common.metrics import ServiceMetrics

    metrics = ServiceMetrics("policy")
    fallbacks.record("attention", "attn_mask")
    fallbacks.record("attention", "attn_mask")
    fallbacks.record("swiglu", "dtype")
    text = generate_latest(metrics.registry).decode()
    assert 'palm_rlhf_kernel_fallbacks_total{op="attention",reason="attn_mask"} 2.0' in text
    assert 'palm_rlhf_kernel_fallbacks_total{op="swiglu",reason="dtype"} 1.0' in text
