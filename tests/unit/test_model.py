"""The PaLM model: shapes, causality, masks, LoRA, compatibility with palm-rlhf-pytorch's API."""

from __future__ import annotations

import math

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.config import PRESETS


def tiny(**kw) -> PaLM:
    torch.manual_seed(0)
    base = {"num_tokens": 50, "dim": 32, "depth": 2, "dim_head": 8, "heads": 4}
    base.update(kw)
    return PaLM(**base).eval()


def test_forward_returns_logits_of_every_position():
    model = tiny()
    x = torch.randint(0, 50, (3, 11))
    assert model(x).shape == (3, 11, 50)


def test_loss_is_next_token_cross_entropy_with_ignore_index():
    model = tiny()
    x = torch.randint(1, 50, (2, 9))
    logits = model(x[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:])
    assert torch.allclose(model(x, return_loss=True), expected, atol=1e-6)
    # pad (id 0) labels are ignored: changing a padded label leaves the loss unchanged
    padded = x.clone()
    padded[:, -1] = 0
    logits = model(padded[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), padded[:, 1:-1])
    assert torch.allclose(model(padded, return_loss=True), expected, atol=1e-6)


def test_future_tokens_leave_past_logits_unchanged():
    model = tiny()
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 50, (2, 5))
    assert not torch.equal(x, y)
    assert torch.allclose(model(x)[:, :7], model(y)[:, :7], atol=1e-5)
    # and the later positions do see the change
    assert not torch.allclose(model(x)[:, 7:], model(y)[:, 7:], atol=1e-3)


def test_non_causal_model_sees_the_future_and_ignores_negative_padding():
    model = tiny(causal=False)
    x = torch.randint(0, 50, (1, 10))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 50
    assert not torch.allclose(model(x)[:, 0], model(y)[:, 0], atol=1e-4)
    padded = torch.cat((x, torch.full((1, 3), -1)), dim=1)
    assert torch.allclose(model(padded)[:, :10], model(x), atol=1e-5)


def test_multi_query_attention_has_one_key_value_head():
    model = tiny()
    cfg = model.config
    w = model.layers[0].fused_attn_ff_proj.weight
    # q for every head, ONE key head, ONE value head, two SwiGLU halves
    assert w.shape == (cfg.heads * cfg.dim_head + 2 * cfg.dim_head + 2 * cfg.ff_inner, cfg.dim)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_embeddings_are_tied_to_the_output_projection():
    model = tiny()
    x = torch.randint(0, 50, (1, 5))
    embeds = model(x, return_only_embedding=True)
    assert torch.allclose(model(x), embeds @ model.token_emb.weight.t(), atol=1e-6)


@pytest.mark.parametrize("kw", [{"qk_rmsnorm": True}, {"rotary_xpos": True}, {"attn_dropout": 0.1, "ff_dropout": 0.1}])
def test_options_train_and_stay_causal(kw):
    model = tiny(**kw)
    x = torch.randint(0, 50, (2, 10))
    model.train()
    loss = model(x, return_loss=True)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 50
    assert torch.allclose(model(x)[:, :6], model(y)[:, :6], atol=1e-5)


def test_config_presets_and_round_trip():
    cfg = PaLMConfig.from_name("demo", depth=3)
    assert cfg.depth == 3 and cfg.dim == PRESETS["demo"].dim
    assert PaLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(KeyError, match="unknown preset"):
        PaLMConfig.from_name("nope")
    with pytest.raises(TypeError, match="unexpected keyword"):
        PaLM(num_tokens=10, dim=8, depth=1, bogus=1)


# --- LoRA ------------------------------------------------------------------------------


def _train_lora(model: PaLM, scope: str, steps: int = 3):
    opt = torch.optim.SGD(model.finetune_parameters(scope), lr=0.5)
    x = torch.randint(0, 50, (2, 8))
    for _ in range(steps):
        opt.zero_grad()
        model(x, return_loss=True, finetune_scope=scope).backward()
        opt.step()


def test_new_lora_is_a_noop_and_disabled_lora_equals_base():
    model = tiny()
    x = torch.randint(0, 50, (2, 8))
    base = model(x)
    model.add_finetune_params("actor", lora_r=4)
    assert torch.allclose(model(x, finetune_scope="actor"), base, atol=1e-6)
    _train_lora(model, "actor")
    tuned = model(x, finetune_scope="actor")
    assert not torch.allclose(tuned, base, atol=1e-4)
    assert torch.allclose(model(x, finetune_scope="actor", disable_lora=True), base, atol=1e-6)
    assert torch.allclose(model(x), base, atol=1e-6)  # no default scope: base model
    with model.lora_scope("actor"):
        assert torch.allclose(model(x), tuned, atol=1e-6)


def test_lora_trains_only_its_own_parameters():
    model = tiny(finetune_scopes=("actor", "critic"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_lora(model, "actor")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("finetune_modules.actor.") for n in changed)


def test_merged_lora_equals_unmerged():
    model = tiny()
    model.add_finetune_params("actor", lora_r=4, lora_alpha=8)
    _train_lora(model, "actor")
    x = torch.randint(0, 50, (2, 8))
    unmerged = model(x, finetune_scope="actor")
    model.merge_finetune_params("actor")
    assert "actor" not in model.finetune_modules
    assert torch.allclose(model(x), unmerged, atol=1e-5)


def test_train_only_last_layers():
    model = tiny(depth=3)
    trainable = model.freeze_all_but_last(1)
    ids = {id(p) for p in trainable}
    assert all(id(p) in ids for p in model.layers[-1].parameters())
    assert all(id(p) not in ids for p in model.layers[0].parameters())
    assert id(model.token_emb.weight) not in ids


def test_unknown_lora_scope_is_a_clear_error():
    model = tiny()
    with pytest.raises(KeyError, match="no LoRA scope 'nope'"):
        model(torch.randint(0, 50, (1, 4)), finetune_scope="nope")


# --- palm-rlhf-pytorch README compatibility ------------------------------------------


def test_readme_examples_run_with_only_the_import_changed():
    torch.manual_seed(0)
    palm = PaLM(num_tokens=256, dim=64, depth=2, flash_attn=True)
    seq = torch.randint(0, 256, (1, 64))
    loss = palm(seq, return_loss=True)
    loss.backward()
    generated = palm.generate(24)  # no prompt: a random start token, whole sequence returned
    assert generated.shape == (1, 24)
    prompt = torch.randint(0, 256, (2, 10))
    out = palm.generate(30, prompt=prompt)  # seq_len counts the prompt; returns the new tokens
    assert out.shape == (2, 20)
    out1d = palm.generate(16, prompt=torch.randint(0, 256, (6,)))
    assert out1d.shape == (10,)
    encoder = PaLM(num_tokens=256, dim=64, depth=2, causal=False)
    assert encoder(seq).shape == (1, 64, 256)


def test_generate_pads_after_eos():
    model = tiny()
    prompt = torch.randint(3, 50, (1, 4))
    greedy = model.generate(12, prompt=prompt, temperature=0.0, filter_logits_fn=None)
    toks = greedy[0].tolist()
    k = next(i for i in range(1, len(toks)) if toks[i] not in toks[:i])  # first repeat-free token
    out = model.generate(12, prompt=prompt, temperature=0.0, filter_logits_fn=None, eos_token=toks[k], pad_value=-1)
    assert out[0, : k + 1].tolist() == toks[: k + 1] and (out[0, k + 1 :] == -1).all()


def test_float32_cpu_weights_are_input_major_and_state_dict_is_contiguous(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny()
    w = model.layers[0].fused_attn_ff_proj.weight
    assert w.stride() == (1, w.shape[0])  # (out, in) view of a contiguous (in, out) buffer
    x = torch.randint(0, 50, (2, 6))
    before = model(x)
    state = model.state_dict()
    assert all(v.is_contiguous() for v in state.values())
    save_file(state, str(tmp_path / "m.safetensors"))
    loaded = PaLM(model.config).eval()
    loaded.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert torch.allclose(loaded(x), before, atol=1e-6)
    model.to(torch.bfloat16)  # other dtypes keep the usual output-major layout
    assert model.layers[0].fused_attn_ff_proj.weight.is_contiguous()
    model.float()
    assert model.layers[0].fused_attn_ff_proj.weight.stride() == (1, w.shape[0])


# --- padding masks in the form the kernels take, autocast ---------------------------------


def _prefill_mask(pad: torch.Tensor, n: int) -> torch.Tensor:
    """The mask of a left-padded prefill, as the generation engine builds it."""
    key_valid = torch.arange(n)[None] >= pad[:, None]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return (key_valid[:, None, None, :] & causal) | torch.eye(n, dtype=torch.bool)


def test_dense_key_mask_is_the_models_own_padding_mask():
    from kernels.dispatch import dense_key_mask

    torch.manual_seed(0)
    mask = torch.rand(3, 9) > 0.3
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    want = (mask[:, None, None, :] & causal) | torch.eye(9, dtype=torch.bool)  # PaLM.forward's causal mask
    assert torch.equal(dense_key_mask(mask, 9, True), want.expand(3, 1, 9, 9))
    assert torch.equal(dense_key_mask(mask, 9, False), mask[:, None, None, :].expand(3, 1, 9, 9))


def test_key_valid_from_mask_recovers_left_padding_and_rejects_other_masks():
    from palm_rlhf.model import key_valid_from_mask

    pad = torch.tensor([0, 3, 5])
    got = key_valid_from_mask(_prefill_mask(pad, 8), causal=True)
    assert torch.equal(got, torch.arange(8)[None] >= pad[:, None])
    other = _prefill_mask(pad, 8).clone()
    other[1, 0, 6, 4] = False  # one query misses one valid key: not a key-padding mask
    assert key_valid_from_mask(other, causal=True) is None
    assert key_valid_from_mask(_prefill_mask(pad, 8), causal=False) is None


def test_masked_forward_is_the_same_through_the_key_padding_form(monkeypatch):
    """PaLM.forward(mask=...) gives the kernels the mask as key_valid; the PyTorch path with
    that key_valid computes what it computes with the model's dense mask."""
    from kernels import dispatch

    model = tiny()
    x = torch.randint(1, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, :3] = False
    want = model(x, mask=mask)
    seen = []
    real = dispatch.attention

    def as_key_valid(q, k, v, causal=True, attn_mask=None, key_valid=None, **kw):
        seen.append(attn_mask is not None)
        if attn_mask is not None:  # hand the padding over in the kernels' form
            key_valid = attn_mask[:, 0, -1, :]
            assert torch.equal(dispatch.dense_key_mask(key_valid, q.shape[-2], True), attn_mask)
            return real(q, k, v, causal=True, key_valid=key_valid, **kw)
        return real(q, k, v, causal=causal, key_valid=key_valid, **kw)

    monkeypatch.setattr(dispatch, "attention", as_key_valid)
    got = model(x, mask=mask)
    assert seen and all(seen)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_autocast_keeps_q_k_v_in_one_dtype(monkeypatch):
    from kernels import dispatch

    model = tiny().train()
    x = torch.randint(1, 50, (2, 12))
    dtypes = []
    real = dispatch.attention

    def spy(q, k, v, *a, **kw):
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(dispatch, "attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, return_loss=True)
    loss.backward()
    assert dtypes == [(torch.bfloat16,) * 3] * 2
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
