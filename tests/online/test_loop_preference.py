"""The online loop with the preference algorithms (DPO, IPO, KTO straight from the logged pairs)
and with Dr. GRPO: a round trains, passes the same gate and publishes."""

from __future__ import annotations

import pytest
import torch

from .conftest import StoreCore, add_completion
from .test_loop import OPEN_GATE, give_feedback, make_loop


@torch.no_grad()
def _pair_margin(core: StoreCore, version: str, parent: str, pairs) -> float:
    """Mean of [log pi(chosen) - log pi(rejected)] under ``version`` minus the same under ``parent``."""
    from palm_rlhf.checkpoint import load_palm
    from palm_rlhf.rl.online import sequence_logps

    def margins(v):
        palm, _ = load_palm(core.policy_store.path(v), dtype=torch.float32)
        prompts = [p.prompt_token_ids for p in pairs]
        chosen = sequence_logps(palm, prompts, [p.chosen_token_ids for p in pairs])
        rejected = sequence_logps(palm, prompts, [p.rejected_token_ids for p in pairs])
        return chosen - rejected

    return float((margins(version) - margins(parent)).mean())


@pytest.mark.parametrize("algorithm", ["dpo", "ipo", "kto"])
def test_a_preference_round_trains_on_the_logged_pairs_and_publishes_through_the_gate(
    tmp_path, feedback_store, algorithm
):
    loop = make_loop(tmp_path, feedback_store, algorithm=algorithm, reward_refit=False, epochs=4, lr=3e-3,
                     **OPEN_GATE)
    give_feedback(feedback_store, 8)
    core = StoreCore(tmp_path)
    version, metrics = loop(core)
    assert version == "v0002", metrics.get("message")
    assert metrics["train_pairs"] > 0 and metrics["train_steps"] >= 4
    assert "train_reward_margin" in metrics and "train_policy_loss" not in metrics  # no rollouts
    assert metrics["gate_passed"] == 1.0 and "candidate_kl" in metrics  # the same gate as RL
    assert core.policy_store.manifest("v0002")["metadata"]["algorithm"] == algorithm
    # the published policy prefers the chosen answers more than its parent did
    from palm_rlhf.rl.online import usable_pairs

    pairs = usable_pairs(loop.files.load_data()["pair"])
    assert _pair_margin(core, "v0002", "v0001", pairs) > 0.5


def test_a_preference_round_without_pairs_trains_nothing(tmp_path, feedback_store):
    loop = make_loop(tmp_path, feedback_store, algorithm="dpo", reward_refit=False, **OPEN_GATE)
    for i in range(6):  # thumbs up only: prompts to learn from, but no pair
        rec = add_completion(feedback_store, f"question number {i}?", ["see the evening", "dark stormy night"])
        feedback_store.add_feedback(rec.id, kind="thumbs", choice_index=0, value=1)
    core = StoreCore(tmp_path)
    version, metrics = loop(core)
    assert version is None and core.policy_store.versions() == ["v0001"]
    assert "no preference pairs to train on yet" in metrics["message"]


def test_a_drgrpo_round_publishes(tmp_path, feedback_store):
    loop = make_loop(tmp_path, feedback_store, algorithm="drgrpo", reward_refit=False, **OPEN_GATE)
    give_feedback(feedback_store, 6)
    version, metrics = loop(StoreCore(tmp_path))
    assert version == "v0002" and "train_policy_loss" in metrics and "train_ref_kl" in metrics
