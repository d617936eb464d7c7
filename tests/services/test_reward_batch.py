"""One reward batch: the reward service's learned scorer and the trainer's refit/gate code
(palm_rlhf.rl.online) read the same (prompt, response) texts the same way, so they give the
same scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from palm_rlhf.config import PaLMConfig
from palm_rlhf.model import PaLM
from palm_rlhf.reward import RewardModel
from palm_rlhf.rl.online import encode_for_reward, reward_batch, reward_scores
from palm_rlhf.tokenizer import load_tokenizer
from services.reward.core import LoadedReward, RewardCore

PROMPTS = ["User: how are you?\nAssistant:", "User: tell me a joke\nAssistant:", "", "x" * 300, "User: hi\nAssistant:"]
RESPONSES = [" I am great, thanks!", " No.", " an answer with no prompt", " short", "y" * 400]


@pytest.fixture(scope="module", params=[5, 0], ids=["binned", "scalar"])
def reward_model(request):
    torch.manual_seed(0)
    palm = PaLM(PaLMConfig.from_name("tiny"))
    model = RewardModel(palm, num_binned_output=request.param, copy_palm=False).eval()
    torch.nn.init.normal_(model.to_pred.weight)  # a head that tells the texts apart clearly
    return model


def test_the_service_and_the_online_loop_score_alike(reward_model):
    tok = load_tokenizer(None)
    loaded = LoadedReward(reward_model, tok, {}, "v0001", Path("."))
    pairs = [(i, p, r) for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
    served, _ = RewardCore._learned(loaded, pairs, None)
    trained = reward_scores(reward_model, tok, PROMPTS, RESPONSES).tolist()
    assert len(set(served)) == len(served)  # the texts are told apart
    assert served == pytest.approx(trained, rel=1e-6, abs=1e-6)


def test_the_batch_holds_each_pair_as_encode_for_reward_reads_it():
    tok = load_tokenizer(None)
    max_len = 64
    x, mask, plen = reward_batch(tok, PROMPTS, RESPONSES, max_len)
    assert x.shape == mask.shape and x.shape[0] == len(PROMPTS) and x.shape[1] <= max_len
    for row, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        ids, n = encode_for_reward(tok, p, r, max_len)
        assert x[row, : len(ids)].tolist() == ids and int(mask[row].sum()) == len(ids)
        assert (x[row, len(ids):] == tok.pad_id).all() and int(plen[row]) == n
    with pytest.raises(ValueError):
        reward_batch(tok, [], [], max_len)
