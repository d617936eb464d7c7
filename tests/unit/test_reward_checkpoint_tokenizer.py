"""Reward model losses, checkpoints, tokenizers."""

from __future__ import annotations

import json

import pytest
import torch

from palm_rlhf import PaLM
from palm_rlhf.checkpoint import (
    CheckpointError,
    CheckpointStore,
    load_checkpoint,
    load_palm,
    save_checkpoint,
    verify_checkpoint,
)
from palm_rlhf.reward import RewardModel, bradley_terry_loss
from palm_rlhf.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def tiny_palm(**kw) -> PaLM:
    torch.manual_seed(0)
    return PaLM(num_tokens=30, dim=32, depth=2, dim_head=8, heads=4, **kw)


# --- reward model ---------------------------------------------------------------------


def toy_pairs(n=8):
    """Prompt tokens 5..9; preferred responses are made of token 20, rejected of token 21."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 10, (n, 4), generator=g)
    chosen = torch.cat((prompts, torch.full((n, 4), 20)), dim=1)
    rejected = torch.cat((prompts, torch.full((n, 4), 21)), dim=1)
    pmask = torch.zeros(n, 8, dtype=torch.bool)
    pmask[:, :4] = True
    return chosen, rejected, pmask


@pytest.mark.parametrize("binned", [0, 5])
def test_bradley_terry_training_ranks_the_preferred_answer_higher(binned):
    rm = RewardModel(tiny_palm(), num_binned_output=binned, dropout=0.0)
    chosen, rejected, pmask = toy_pairs()
    with torch.no_grad():
        before = (rm(chosen, prompt_mask=pmask) - rm(rejected, prompt_mask=pmask)).mean().item()
    # expected bin values saturate: the binned head needs a gentler step
    opt = torch.optim.Adam(rm.finetune_parameters(), lr=1e-2 if binned else 3e-2)
    for _ in range(40):
        opt.zero_grad()
        loss = rm.pairwise_loss(chosen, rejected, pmask, pmask, margin=0.5)
        loss.backward()
        opt.step()
    with torch.no_grad():
        rc, rr = rm(chosen, prompt_mask=pmask), rm(rejected, prompt_mask=pmask)
    assert (rc > rr).all(), (rc, rr)
    assert (rc - rr).mean().item() > before + 0.5, (before, rc, rr)


def test_rating_cross_entropy_and_regression_learn_their_targets():
    chosen, rejected, pmask = toy_pairs()
    x = torch.cat((chosen, rejected))
    pm = torch.cat((pmask, pmask))
    ratings = torch.tensor([4] * 8 + [0] * 8)  # label 4 (a 5-star) for token-20 answers
    binned = RewardModel(tiny_palm(), num_binned_output=5, dropout=0.0)
    scalar = RewardModel(tiny_palm(), dropout=0.0)
    rewards = []
    for rm, labels in ((binned, ratings), (scalar, ratings.float())):
        opt = torch.optim.Adam(rm.finetune_parameters(), lr=3e-2)
        for _ in range(30):
            opt.zero_grad()
            rm(x, prompt_mask=pm, labels=labels).backward()
            opt.step()
        with torch.no_grad():
            r = rm(x, prompt_mask=pm)
        assert r.shape == (16,)
        assert r[:8].min() > r[8:].max()
        rewards.append(r)
    # the binned reward is the expected bin value, inside [0, bins - 1], near the targets
    assert 0 <= rewards[0].min() and rewards[0].max() <= 4
    assert rewards[0][:8].mean() > 3 and rewards[0][8:].mean() < 1


def test_bradley_terry_loss_values():
    assert torch.isclose(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])), torch.log(torch.tensor(2.0)))
    assert bradley_terry_loss(torch.tensor([5.0]), torch.tensor([0.0])) < 0.01
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0) > bradley_terry_loss(
        torch.tensor([1.0]), torch.tensor([0.0])
    )


def test_reward_pools_over_the_response_only():
    rm = RewardModel(tiny_palm(), dropout=0.0).eval()
    with torch.no_grad():
        rm.response_embed.normal_()
        rm.to_pred.weight.normal_()
    chosen, _, pmask = toy_pairs(2)
    changed = chosen.clone()
    changed[:, 5:] = 22
    a, b = rm(chosen, prompt_mask=pmask), rm(changed, prompt_mask=pmask)
    assert not torch.allclose(a, b)
    lengths = torch.tensor([4, 4])
    assert torch.allclose(rm(chosen, prompt_lengths=lengths), a)


def test_reward_checkpoint_round_trip(tmp_path):
    rm = RewardModel(tiny_palm(finetune_scopes=("actor",)), num_binned_output=5).eval()
    with torch.no_grad():
        for p in rm.finetune_parameters():
            p.normal_()
    rm.save(tmp_path / "rm")
    loaded, manifest = RewardModel.from_checkpoint(tmp_path / "rm")
    x, _, pm = toy_pairs(3)
    assert torch.allclose(rm(x, prompt_mask=pm), loaded(x, prompt_mask=pm), atol=1e-6)
    assert manifest["kind"] == "reward"


# --- checkpoints ------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_weights_config_and_lora(tmp_path):
    model = tiny_palm()
    model.add_finetune_params("actor", lora_r=4)
    with torch.no_grad():
        for p in model.finetune_parameters("actor"):
            p.normal_()
    path = save_checkpoint(tmp_path / "ck", model, model.config, version="v7", parent="v6")
    loaded, manifest = load_palm(path)
    x = torch.randint(0, 30, (2, 6))
    model.eval()
    assert torch.allclose(model(x, finetune_scope="actor"), loaded(x, finetune_scope="actor"), atol=1e-6)
    assert manifest["version"] == "v7" and manifest["parent"] == "v6"
    assert manifest["config"]["dim"] == 32
    assert len(manifest["files"]["model.safetensors"]["sha256"]) == 64


def test_corrupted_or_truncated_checkpoint_is_detected(tmp_path):
    model = tiny_palm()
    path = save_checkpoint(tmp_path / "ck", model, model.config)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match="bytes"):
        verify_checkpoint(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_checkpoints_never_unpickle(tmp_path):
    state = tiny_palm().state_dict()
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="only safetensors"):
        tiny_palm().load(str(tmp_path / "model.pt"))


def test_refuses_to_overwrite_and_leaves_no_partial_folder(tmp_path):
    model = tiny_palm()
    save_checkpoint(tmp_path / "ck", model, model.config)
    with pytest.raises(CheckpointError, match="overwrite"):
        save_checkpoint(tmp_path / "ck", model, model.config)

    # a failure half-way through (here: an unsaveable entry) leaves nothing behind
    with pytest.raises(AttributeError):
        save_checkpoint(tmp_path / "ck2", {"w": torch.ones(2), "bad": "not a tensor"}, model.config)
    assert not (tmp_path / "ck2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_store_versions_current_and_rollback(tmp_path):
    store = CheckpointStore(tmp_path, "policy")
    model = tiny_palm()
    v1 = store.save(model, model.config)
    v2 = store.save(model, model.config, parent=v1)
    (store.root / ".v0003.tmp-abc").mkdir()  # an interrupted write
    (store.root / "v0003").mkdir()  # a folder without a manifest is not a version
    assert store.versions() == [v1, v2] and store.current() == v2
    assert store.rollback() == v1 and store.current() == v1
    assert CheckpointStore(tmp_path, "policy").current() == v1  # the pointer is on disk
    with pytest.raises(CheckpointError, match="no parent"):
        store.rollback()
    with pytest.raises(CheckpointError, match="no policy version"):
        store.set_current("v0099")


# --- tokenizers -------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "héllo, wörld! ☃ \n tabs\t"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("☃")[:2]) == "\ufffd"  # a cut character decodes, replaced


def test_hf_tokenizer_json_is_loaded_from_disk(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<pad>", "<unk>", "</s>"])
    hf.train_from_iterator(["the cat sat on the mat", "the dog sat on the log"] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.pad_id == 0 and tok.eos_id == hf.token_to_id("</s>")
    ids = tok.encode("the cat sat")
    assert tok.decode(ids).replace(" ", "") == "thecatsat"
    again = load_tokenizer(tok.to_dict())
    assert again.encode("the dog") == tok.encode("the dog")
    assert json.loads(json.dumps(tok.to_dict()))["kind"] == "hf"
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
