"""The experience buffer keeps rows exactly, in RAM or spilled to a memory-mapped file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from palm_rlhf.rl.buffer import ExperienceBuffer
from palm_rlhf.rl.rollout import pack_sequences


def _batch(n, gen, max_prompt=5, max_resp=7):
    prompts = [
        torch.randint(
            1, 50, (int(torch.randint(1, max_prompt + 1, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(n)
    ]
    resps = [
        torch.randint(
            1, 50, (int(torch.randint(0, max_resp + 1, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(n)
    ]
    p = pack_sequences(prompts, resps)
    w = p["action_mask"].shape[1]
    rows = {
        "sequences": p["sequences"],
        "attention_mask": p["attention_mask"],
        "action_mask": p["action_mask"],
        "old_logprobs": p["old_logprobs"] - torch.rand(n, w, generator=gen),
        "ref_logprobs": torch.randn(n, w, generator=gen),
        "values": torch.randn(n, w, generator=gen),
        "rewards": torch.randn(n, w, generator=gen),
        "advantages": torch.randn(n, w, generator=gen),
        "returns": torch.randn(n, w, generator=gen),
        "scores": torch.randn(n, generator=gen),
    }
    return rows


def _pad(t, width):
    out = torch.zeros(t.shape[0], width, dtype=t.dtype)
    out[:, : t.shape[1]] = t
    return out


@pytest.mark.parametrize("limit", [None, 2000])
def test_buffer_round_trips_in_memory_and_spilled(tmp_path, limit):
    gen = torch.Generator().manual_seed(0)
    buf = ExperienceBuffer(max_len=16, max_memory_bytes=limit, spill_dir=tmp_path)
    batches = [_batch(n, gen) for n in (3, 9, 30, 5)]
    for b in batches:
        buf.add(**b)
    assert len(buf) == 47
    assert buf.spilled == (limit is not None)
    if limit is not None:
        files = list(tmp_path.rglob("*.bin"))
        assert files and all(f.stat().st_size > 0 for f in files)
        assert isinstance(buf._arrays["sequences"], np.memmap)
    for name in batches[0]:
        got = buf.get(name)
        want = torch.cat([_pad(b[name], buf.width(name)) if b[name].dim() == 2 else b[name] for b in batches])
        assert torch.equal(got, want.to(got.dtype)), name
    # a field can be rewritten in place (advantages after whitening)
    new_adv = torch.randn(47, 15, generator=gen)
    buf.set("advantages", new_adv)
    assert torch.equal(buf.get("advantages"), new_adv)
    buf.close()
    assert not list(tmp_path.rglob("*.bin"))


def test_minibatches_cover_every_row_once_and_are_seeded(tmp_path):
    gen = torch.Generator().manual_seed(1)
    buf = ExperienceBuffer(max_len=16, max_memory_bytes=1000, spill_dir=tmp_path)
    buf.add(**_batch(21, gen))
    scores = buf.get("scores")
    seen = torch.cat([mb["scores"] for mb in buf.minibatches(4, seed=3)])
    assert sorted(seen.tolist()) == sorted(scores.tolist())
    again = torch.cat([mb["scores"] for mb in buf.minibatches(4, seed=3)])
    other = torch.cat([mb["scores"] for mb in buf.minibatches(4, seed=4)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)
    for mb in buf.minibatches(5, seed=0):
        # trimmed to the longest row of the minibatch, nothing valid cut off
        width = mb["sequences"].shape[1]
        assert mb["attention_mask"][:, -1].any() or width == 2
        assert mb["old_logprobs"].shape[1] == width - 1
    # shards of one global minibatch partition it
    full = [mb["scores"] for mb in buf.minibatches(6, seed=9)]
    s0 = [mb["scores"] for mb in buf.minibatches(6, seed=9, shard=(0, 2))]
    s1 = [mb["scores"] for mb in buf.minibatches(6, seed=9, shard=(1, 2))]
    for f, a, b in zip(full, s0, s1):
        assert sorted(f.tolist()) == sorted(torch.cat([a, b]).tolist())
    buf.close()


def test_buffer_rejects_bad_input():
    buf = ExperienceBuffer(max_len=4)
    gen = torch.Generator().manual_seed(2)
    b = _batch(2, gen, max_prompt=2, max_resp=2)
    with pytest.raises(ValueError, match="missing"):
        buf.add(sequences=b["sequences"])
    b["sequences"] = torch.zeros(2, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="expected"):
        buf.add(**b)
