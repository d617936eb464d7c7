"""The online loop in one process: tiny models in real checkpoint stores, a real SQLite
feedback log, and the reference/reward services answered by local stand-ins."""

from __future__ import annotations

import json

import pytest
import torch

from palm_rlhf.rl.feedback import PreferencePair
from palm_rlhf.rl.online import pairwise_accuracy, reward_publish_decision, split_pairs
from services.trainer.loop import LoopStore, OnlineLoop, OnlineSettings, parse_scorer

from .conftest import LocalClients, StoreCore, add_completion, make_stores, tiny_palm

FAST = {"iterations": 2, "prompts_per_iteration": 2, "group_size": 2, "max_new_tokens": 6, "epochs": 1,
        "reward_steps": 3, "eval_prompts": 4, "reward_min_heldout": 1, "gate_min_pairs": 1, "heldout_fraction": 0.5,
        "eval_samples": 1, "reward_scorer": "sentiment"}  # LocalClients scores with a rule, whatever the name
OPEN_GATE = {"kl_budget": 1e9, "gate_reward_confidence": -1e9, "gate_min_reward_gain": -1e9, "gate_rank_alpha": 1.0,
             "gate_max_repetition": 1.0, "gate_min_length_ratio": 0.0, "gate_max_length_ratio": 1e9,
             "gate_pair_tolerance": 1.0}


def make_loop(tmp_path, feedback_store, clients=None, **settings) -> OnlineLoop:
    make_stores(tmp_path) if not (tmp_path / "checkpoints").exists() else None
    clients = clients or LocalClients(tiny_palm(0).eval(), lambda t: t.count("e") / 10)
    s = OnlineSettings(**{**FAST, **settings})
    return OnlineLoop(tmp_path, feedback_store.url, clients, s)


def give_feedback(feedback_store, n_prompts: int = 6, start: int = 0) -> list[int]:
    ids = []
    for i in range(start, start + n_prompts):
        rec = add_completion(feedback_store, f"question number {i}?", ["see the evening", "dark stormy night"])
        ids.append(feedback_store.add_feedback(rec.id, kind="thumbs", choice_index=0, value=1)[0].id)
        ids.append(feedback_store.add_feedback(rec.id, kind="thumbs", choice_index=1, value=-1)[0].id)
        ids.append(feedback_store.add_feedback(rec.id, kind="preference", preferred_index=0, rejected_index=1)[0].id)
    return ids


def test_feedback_is_read_incrementally_and_the_cursor_survives_a_restart(tmp_path, feedback_store):
    loop = make_loop(tmp_path, feedback_store, reward_refit=False)
    ids = give_feedback(feedback_store, 2)
    state = loop.files.load_state()
    assert loop.ingest(state) == (6, 0)
    assert json.loads((tmp_path / "trainer" / "online-state.json").read_text())["last_feedback_id"] == ids[-1]
    assert loop.ingest(state) == (0, 0)  # nothing new
    more = give_feedback(feedback_store, 1, start=2)
    restarted = make_loop(tmp_path, feedback_store, reward_refit=False)  # a new process: state from disk
    state = restarted.files.load_state()
    assert state.last_feedback_id == ids[-1]
    assert restarted.ingest(state) == (3, 0) and state.last_feedback_id == more[-1]
    data = restarted.files.load_data()
    assert len(data["prompt"]) == 3 and len(data["pair"]) == 3  # thumbs pair and explicit pair coincide
    assert {p.chosen for p in data["pair"]} == {"see the evening"}


def test_rereading_after_a_crash_before_the_cursor_moved_does_not_duplicate(tmp_path, feedback_store):
    loop = make_loop(tmp_path, feedback_store, reward_refit=False)
    give_feedback(feedback_store, 2)
    state = loop.files.load_state()
    loop.ingest(state)
    # the data file was written but the process died before saving the cursor
    (tmp_path / "trainer" / "online-state.json").unlink()
    loop.ingest(loop.files.load_state())
    data = LoopStore(tmp_path).load_data()
    assert len(data["prompt"]) == 2 and len(data["thumb"]) == 4 and len(data["pair"]) == 2


def test_reward_publish_decision_wants_a_confident_improvement_on_held_out_pairs():
    # 12 held-out pairs; the refit fixes 6 the current model got wrong and breaks none: p = 1/64
    before = [1.0] * 6 + [0.0] * 6
    assert reward_publish_decision(before, [1.0] * 12, min_heldout=4)[0]
    # fixing 3 is not enough evidence at the 5% level (p = 1/8), equal is not better, worse is worse
    ok, why = reward_publish_decision(before, [1.0] * 9 + [0.0] * 3, min_heldout=4)
    assert not ok and "p=0.125" in why
    assert not reward_publish_decision(before, before, min_heldout=4)[0]
    ok, why = reward_publish_decision([1.0] * 12, before, min_heldout=4)
    assert not ok and "not better" in why
    assert not reward_publish_decision([0.0] * 2, [1.0] * 2, min_heldout=4)[0]


def _pairs(prompts, chosen: str, rejected: str) -> list[PreferencePair]:
    return [PreferencePair(p, [1], chosen, rejected, [5], [6], "preference", i) for i, p in enumerate(prompts)]


def _reward_model(tmp_path):
    from palm_rlhf.reward import RewardModel
    from palm_rlhf.tokenizer import ByteTokenizer

    st = StoreCore(tmp_path).reward_store
    model, _ = RewardModel.from_checkpoint(st.path(st.current()))
    return model, ByteTokenizer()


def test_pairs_are_held_out_by_pair_so_one_prompt_still_gives_a_held_out_set():
    prompt = "User: the only question\nAssistant:"
    pairs = [PreferencePair(prompt, [1], f"answer {i}", f"other {i}", [5], [6], "preference", i) for i in range(200)]
    train, held = split_pairs(pairs, 0.2)
    assert 25 <= len(held) <= 55 and len(train) + len(held) == 200
    assert split_pairs(pairs, 0.2) == (train, held)  # stable across rounds and processes


@pytest.mark.parametrize("held_out_agrees_with_training", [True, False])
def test_reward_refit_is_published_only_if_it_beats_the_current_reward_on_held_out_pairs(
        tmp_path, feedback_store, held_out_agrees_with_training):
    make_stores(tmp_path)
    model, tok = _reward_model(tmp_path)
    a, b = "sunny and bright", "grey rain all day"
    prompts = [f"User: question {i}\nAssistant:" for i in range(40)]
    # the answer the seeded head ranks lower on most prompts is the one people prefer: the
    # current reward is mostly wrong, so a refit has room to be better
    good, bad = (b, a) if pairwise_accuracy(model, tok, _pairs(prompts, a, b)) > 0.5 else (a, b)
    held = split_pairs(_pairs(prompts, good, bad), 0.5)[1]
    train = split_pairs(_pairs(prompts, good, bad) if held_out_agrees_with_training else _pairs(prompts, bad, good),
                        0.5)[0]
    assert len(held) >= 8 and len(train) >= 8
    clients = LocalClients(tiny_palm(0), len)
    loop = make_loop(tmp_path, feedback_store, clients, reward_steps=200, reward_min_heldout=4)
    core = StoreCore(tmp_path)
    out = loop.refit_reward(core, {"pair": train + held, "rating": [], "thumb": [], "prompt": []})
    assert out["reward_heldout_accuracy_before"] < 0.5
    if held_out_agrees_with_training:
        assert out["reward_published"] == 1.0 and out["reward_heldout_accuracy_after"] == 1.0
        assert core.reward_store.current() == "v0002" and clients.loaded == ["v0002"]
        m = core.reward_store.manifest("v0002")
        assert m["parent"] == "v0001" and m["metadata"]["heldout_accuracy"] == 1.0
        assert m["metadata"]["fitted_on_feedback"] is True and "reward_head" in m["metadata"]
        # the published model ranks as the refit did, read back from the store by a fresh process
        fresh, _ = _reward_model(tmp_path)
        assert pairwise_accuracy(fresh, tok, held) == 1.0
    else:
        assert out["reward_heldout_accuracy_after"] <= out["reward_heldout_accuracy_before"]
        assert out["reward_published"] == 0.0 and "not better" in out["reward_message"]
        assert core.reward_store.versions() == ["v0001"] and clients.loaded == []


def test_the_first_refit_is_compared_with_chance_and_later_ones_with_the_fitted_reward(tmp_path, feedback_store):
    make_stores(tmp_path)
    model, tok = _reward_model(tmp_path)
    a, b = "sunny and bright", "grey rain all day"
    prompts = [f"User: question {i}\nAssistant:" for i in range(40)]
    # people prefer what the seeded head happens to rank higher: it is "right" by luck
    good, bad = (a, b) if pairwise_accuracy(model, tok, _pairs(prompts, a, b)) > 0.5 else (b, a)
    pairs = _pairs(prompts, good, bad)
    loop = make_loop(tmp_path, feedback_store, reward_steps=200, reward_min_heldout=4)
    core = StoreCore(tmp_path)
    first = loop.refit_reward(core, {"pair": pairs, "rating": [], "thumb": [], "prompt": []})
    assert first["reward_heldout_accuracy_before"] > 0.5
    assert first["reward_published"] == 1.0 and "against chance" in first["reward_message"]
    second = loop.refit_reward(core, {"pair": pairs, "rating": [], "thumb": [], "prompt": []})
    assert second["reward_published"] == 0.0 and "not better" in second["reward_message"]
    assert core.reward_store.versions() == ["v0001", "v0002"]


def _thumbs_on_a_chat(feedback_store, liked: str, disliked: str, n: int = 60, flip_training: bool = False):
    """One shown answer per prompt and a thumb on it, every prompt different (as in a chat: each
    turn's prompt holds the whole conversation so far), so no two thumbs ever make a pair."""
    from palm_rlhf.rl.feedback import ThumbExample
    from palm_rlhf.rl.online import pair_is_heldout

    for i in range(n):
        answer = liked if i % 2 == 0 else disliked
        prompt = f"question number {i}, after {i} earlier turns?"
        rec = add_completion(feedback_store, prompt, [answer])
        up = answer == liked
        probe = ThumbExample(rec.prompt_text, [], answer, [], up, 0, rec.id, 0)
        if flip_training and not pair_is_heldout(probe, 0.5):
            up = not up  # the training side says the opposite of the held-out side
        feedback_store.add_feedback(rec.id, kind="thumbs", choice_index=0, value=1 if up else -1)


@pytest.mark.parametrize("held_out_agrees_with_training", [True, False])
def test_thumbs_alone_on_prompts_never_repeated_refit_the_reward(tmp_path, feedback_store,
                                                                  held_out_agrees_with_training):
    a, b = "sunny and bright", "grey rain all day"
    clients = LocalClients(tiny_palm(0), len)
    loop = make_loop(tmp_path, feedback_store, clients, reward_steps=200, reward_min_heldout=4)
    model, tok = _reward_model(tmp_path)
    probe = [f"User: question {i}\nAssistant:" for i in range(20)]
    liked, disliked = (b, a) if pairwise_accuracy(model, tok, _pairs(probe, a, b)) > 0.5 else (a, b)
    _thumbs_on_a_chat(feedback_store, liked, disliked, flip_training=not held_out_agrees_with_training)
    loop.ingest(loop.files.load_state())
    data = loop.files.load_data()
    assert data["pair"] == [] and len(data["thumb"]) == 60  # no thumb met another on its prompt
    core = StoreCore(tmp_path)
    out = loop.refit_reward(core, data)
    assert out["reward_train_thumbs"] > 15 and out["reward_heldout_thumb_pairs"] >= 4
    assert out["reward_heldout_pairs"] == 0.0
    if held_out_agrees_with_training:
        assert out["reward_published"] == 1.0 and out["reward_heldout_accuracy_after"] == 1.0
        assert core.reward_store.current() == "v0002" and clients.loaded == ["v0002"]
        fresh, _ = _reward_model(tmp_path)  # read back: liked answers now score higher on new prompts
        assert pairwise_accuracy(fresh, tok, _pairs(probe, liked, disliked)) == 1.0
        assert core.reward_store.manifest("v0002")["metadata"]["train_thumbs"] == out["reward_train_thumbs"]
    else:
        assert out["reward_heldout_accuracy_after"] < 0.5
        assert out["reward_published"] == 0.0 and core.reward_store.versions() == ["v0001"]


def test_the_lora_refit_also_trains_on_thumbs_and_checks_held_out_thumb_pairs(tmp_path, feedback_store):
    import math

    loop = make_loop(tmp_path, feedback_store, reward_refit_mode="lora", reward_steps=4, reward_lr=3e-4,
                     reward_min_heldout=1000)  # never publishes: the figures are what is checked
    _thumbs_on_a_chat(feedback_store, "sunny and bright", "grey rain all day", n=24)
    loop.ingest(loop.files.load_state())
    out = loop.refit_reward(StoreCore(tmp_path), loop.files.load_data())
    assert out["reward_train_thumbs"] > 5 and out["reward_heldout_thumb_pairs"] >= 2
    assert math.isfinite(out["reward_heldout_accuracy_before"]) and math.isfinite(out["reward_heldout_accuracy_after"])
    assert out["reward_published"] == 0.0 and "not enough held-out pairs" in out["reward_message"]


def test_a_changed_thumb_counts_once_with_its_last_verdict_and_check_pairs_use_each_thumb_once():
    from palm_rlhf.rl.feedback import ThumbExample
    from palm_rlhf.rl.online import latest_thumbs, thumb_check_pairs, thumbs_as_ratings

    t = [ThumbExample("p1", [], "x", [], True, 1, "c1", 0), ThumbExample("p2", [], "y", [], False, 2, "c2", 0),
         ThumbExample("p1", [], "x", [], False, 3, "c1", 0), ThumbExample("p3", [], "z", [], True, 4, "c3", 1),
         ThumbExample("p4", [], "w", [], True, 5, "c4", 0)]
    last = latest_thumbs(t)
    assert [(x.completion_id, x.up) for x in last] == [("c2", False), ("c1", False), ("c3", True), ("c4", True)]
    assert [r.label for r in thumbs_as_ratings(last, 5)] == [0, 0, 4, 4]
    assert thumbs_as_ratings(last, 0) == []  # a scalar head has no bins to label
    pairs = thumb_check_pairs(last)
    assert [(u.completion_id, d.completion_id) for u, d in pairs] == [("c3", "c2"), ("c4", "c1")]


def test_the_refit_continues_from_the_last_refit_even_when_it_was_not_published(tmp_path, feedback_store):
    make_stores(tmp_path)
    prompts = [f"User: question {i}\nAssistant:" for i in range(12)]
    pairs = _pairs(prompts, "sunny and bright", "grey rain all day")
    loop = make_loop(tmp_path, feedback_store, reward_steps=5, reward_min_heldout=1000)  # never publishes
    core = StoreCore(tmp_path)
    first = loop.refit_reward(core, {"pair": pairs, "rating": [], "thumb": [], "prompt": []})
    second = loop.refit_reward(core, {"pair": pairs, "rating": [], "thumb": [], "prompt": []})
    assert first["reward_published"] == second["reward_published"] == 0.0
    assert first["reward_warm_start"] == 0.0 and second["reward_warm_start"] == 1.0
    # it picked up where it stopped: the second refit starts from a lower loss
    assert second["reward_loss_first"] < first["reward_loss_first"] - 1e-4


def test_the_policy_does_not_train_against_a_learned_reward_never_trained(tmp_path, feedback_store):
    loop = make_loop(tmp_path, feedback_store, reward_scorer="learned", reward_refit=False, **OPEN_GATE)
    give_feedback(feedback_store, 8)
    core = StoreCore(tmp_path)
    version, metrics = loop(core)
    assert version is None and core.policy_store.versions() == ["v0001"]
    assert metrics["outcome"] == "waiting" and "fitted on feedback" in metrics["message"]


def test_the_policy_trains_at_once_against_a_reward_trained_before_it_was_shipped(tmp_path, feedback_store):
    from palm_rlhf.checkpoint import CheckpointStore
    from palm_rlhf.reward import RewardModel

    make_stores(tmp_path)
    st = CheckpointStore(tmp_path / "checkpoints", "reward")
    rm, _ = RewardModel.from_checkpoint(st.path("v0001"))
    # as the demo reward model's build records it: it was trained on preference pairs
    st.save(rm, rm.palm.config, tokenizer={"kind": "byte"}, parent="v0001",
            metadata={"reward_head": rm.head_config(), "figures": {"heldout_pair_accuracy": {"all": 0.9}}})
    loop = make_loop(tmp_path, feedback_store, reward_scorer="learned", reward_refit=False, **OPEN_GATE)
    give_feedback(feedback_store, 8)
    core = StoreCore(tmp_path)
    version, metrics = loop(core)
    assert version == "v0002" and metrics["outcome"] == "published"


def test_the_shipped_demo_reward_counts_as_trained_and_a_fresh_head_does_not(tmp_path):
    from palm_rlhf.checkpoint import CheckpointStore
    from palm_rlhf.demo import demo_checkpoint_dir
    from services.reward.core import init_reward_store
    from services.trainer.loop import reward_is_trained

    demo = CheckpointStore(tmp_path / "demo", "reward")
    v = init_reward_store(demo, demo_checkpoint_dir(build_if_missing=False))
    assert reward_is_trained(demo.manifest(v)["metadata"])  # up seeds this one: the policy trains at once
    make_stores(tmp_path / "tiny")
    tiny_policy = CheckpointStore(tmp_path / "tiny" / "checkpoints", "policy")
    fresh = CheckpointStore(tmp_path / "fresh", "reward")
    v = init_reward_store(fresh, tiny_policy.path(tiny_policy.current()))
    assert not reward_is_trained(fresh.manifest(v)["metadata"])
    assert reward_is_trained({"fitted_on_feedback": True}) and not reward_is_trained({"figures": {}})


def test_a_round_trains_gates_and_publishes_with_parent_and_gate_metrics(tmp_path, feedback_store):
    loop = make_loop(tmp_path, feedback_store, **OPEN_GATE)
    give_feedback(feedback_store, 8)
    core = StoreCore(tmp_path)
    version, metrics = loop(core)
    assert version == "v0002" and core.published == ["v0002"]
    m = core.policy_store.manifest("v0002")
    assert m["parent"] == "v0001" and m["lora"] == {}
    assert m["metadata"]["gate"]["passed"] is True and "kl" in m["metadata"]["gate"]["candidate"]
    assert metrics["gate_passed"] == 1.0 and metrics["feedback_new"] == 24
    assert "published v0002" in metrics["message"]
    # the published weights are the actor's (changed), not a copy of the parent
    from palm_rlhf.checkpoint import load_checkpoint

    new, _ = load_checkpoint(core.policy_store.path("v0002"))
    old, _ = load_checkpoint(core.policy_store.path("v0001"))
    assert any(not torch.allclose(new[k].float(), old[k].float()) for k in old)
    # nothing new: the next round does not train
    again, info = loop(core)
    assert again is None and info["message"] == "no new feedback" and core.policy_store.versions() == ["v0001", "v0002"]


def test_a_round_whose_candidate_breaks_the_kl_budget_publishes_nothing(tmp_path, feedback_store):
    loop = make_loop(tmp_path, feedback_store, kl_budget=-1.0, reward_refit=False, lr=1e-2)
    give_feedback(feedback_store, 8)
    core = StoreCore(tmp_path)
    version, metrics = loop(core)
    assert version is None and core.policy_store.versions() == ["v0001"]
    assert metrics["gate_kl"] == 0.0 and metrics["gate_passed"] == 0.0 and "KL" in metrics["message"]
    state = LoopStore(tmp_path).load_state()
    assert state.rounds == 1 and state.history[-1]["published"] is None


def test_scorer_specifications():
    assert parse_scorer("sentiment") == {"sentiment": 1.0}
    assert parse_scorer("learned:0.5+sentiment:2") == {"learned": 0.5, "sentiment": 2.0}
    with pytest.raises(ValueError, match="unknown reward scorer"):
        parse_scorer("vibes")


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("PALM_RLHF_REWARD_SCORER", "learned+sentiment")
    monkeypatch.setenv("PALM_RLHF_KL_BUDGET", "3.5")
    monkeypatch.setenv("PALM_RLHF_RL_ALGORITHM", "grpo")
    monkeypatch.setenv("PALM_RLHF_REWARD_REFIT", "0")
    s = OnlineSettings.from_env()
    assert (s.reward_scorer, s.kl_budget, s.algorithm, s.reward_refit) == ("learned+sentiment", 3.5, "grpo", False)
    assert s.gate_config().kl_budget == 3.5
    monkeypatch.setenv("PALM_RLHF_RL_ALGORITHM", "a2c")
    with pytest.raises(ValueError, match="ppo, grpo, drgrpo, rloo, dpo, ipo or kto"):
        OnlineSettings.from_env()


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_other_algorithms_run_a_round(tmp_path, feedback_store, algorithm):
    loop = make_loop(tmp_path, feedback_store, algorithm=algorithm, reward_refit=False, **OPEN_GATE)
    give_feedback(feedback_store, 6)
    version, metrics = loop(StoreCore(tmp_path))
    assert version == "v0002" and "train_policy_loss" in metrics
    if algorithm == "ppo":
        assert "train_value_loss" in metrics
