"""A fresh data directory gets the shipped demo reward model next to the demo policy, in the
format the reward service loads; any other starting policy gets a fresh head."""

from __future__ import annotations

import torch

from palm_rlhf.checkpoint import load_state_dict, read_manifest
from palm_rlhf.demo import DEMO_REWARD_VERSION, demo_reward_dir
from services.common.models import ensure_policy_store, shipped_reward_for, store
from services.reward.core import init_reward_store, load_reward


def test_first_start_seeds_the_shipped_reward_model(tmp_path):
    policy_version = ensure_policy_store(tmp_path)
    policy_path = store(tmp_path, "policy").path(policy_version)
    assert shipped_reward_for(policy_path) == demo_reward_dir()

    st = store(tmp_path, "reward")
    version = init_reward_store(st, policy_path)
    assert st.current() == version
    manifest = read_manifest(st.path(version))
    assert manifest["kind"] == "reward" and manifest["metadata"]["source"] == DEMO_REWARD_VERSION
    seeded, shipped = load_state_dict(st.path(version)), load_state_dict(demo_reward_dir())
    assert seeded.keys() == shipped.keys()
    assert all(torch.equal(seeded[k].float(), shipped[k].float()) for k in shipped)

    # the reward service loads it and scores an on-topic answer above an off-topic one
    loaded = load_reward(st.path(version), version, "cpu")
    from palm_rlhf.chat import format_chat
    from palm_rlhf.rl.online import reward_scores

    prompt = format_chat([{"role": "user", "content": "So, is Oslo worth a visit?"}])
    scores = reward_scores(
        loaded.model, loaded.tokenizer, [prompt, prompt],
        ["My trip to Oslo was wonderful, the people were so kind.", "I water my tomatoes every evening."],
    )
    assert scores[0] > scores[1], scores


def test_another_policy_gets_a_fresh_head(tmp_path, tiny_checkpoint):
    assert shipped_reward_for(tiny_checkpoint) is None
    st = store(tmp_path, "reward")
    version = init_reward_store(st, tiny_checkpoint)
    manifest = read_manifest(st.path(version))
    assert manifest["kind"] == "reward" and "source" not in manifest["metadata"]
    assert manifest["config"] == read_manifest(tiny_checkpoint)["config"]
