"""Shared fixtures of the RL tests: a seed and tiny PaLMs."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf import PaLM


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning
    OpenMP workers slow them down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_palm():
    def make(num_tokens: int = 16, max_seq_len: int = 64) -> PaLM:
        return PaLM(num_tokens=num_tokens, dim=32, depth=2, dim_head=16, heads=2, max_seq_len=max_seq_len)

    return make


@pytest.fixture
def target_fraction_reward():
    """A rule reward factory: the fraction of response tokens equal to ``target``."""

    def make(target: int):
        def reward(seq, mask=None, prompt_mask=None):
            resp = mask & ~prompt_mask
            return ((seq == target) & resp).sum(1).float() / resp.sum(1).clamp(min=1)

        return reward

    return make
