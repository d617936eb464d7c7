"""RLHFTrainer learns on a toy reward, picks the best of n, and saves/restores its state."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf import RLHFTrainer
from palm_rlhf.generation import SamplingParams, generate_tokens

TARGET = 5


def _mean_target_fraction(palm, prompts, scope, n=32, new=16):
    res = generate_tokens(
        palm, prompts, SamplingParams(max_new_tokens=new, n=n, seed=123), finetune_scope=scope
    )
    toks = [t for group in res for c in group for t in c.token_ids]
    return sum(t == TARGET for t in toks) / len(toks)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_trainer_improves_toy_reward(tiny_palm, target_fraction_reward, algorithm):
    palm = tiny_palm()
    prompts = torch.randint(1, 16, (8, 4))
    plist = [row.tolist() for row in prompts]
    before = _mean_target_fraction(palm, plist, None)
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=target_fraction_reward(TARGET),
        prompt_token_ids=prompts,
        algorithm=algorithm,
        actor_lora=False,  # a random tiny model's tied embeddings are too small for LoRA alone
        actor_lr=1e-2 if algorithm == "ppo" else 3e-3,
        critic_lr=3e-3,
        minibatch_size=16,
        epochs=4 if algorithm == "ppo" else 2,
        kl_div_loss_weight=0.01,
        seed=0,
        use_tqdm=False,
    )
    history = trainer.train(num_episodes=10, max_timesteps=8, update_timesteps=16, max_seq_len=20)
    assert len(history) == 5
    after = _mean_target_fraction(palm, plist, trainer.actor.scope)
    assert before < 0.1  # 1/16 by chance
    assert after > before + 0.08, (before, after, [round(h["score"], 3) for h in history])
    assert history[-1]["score"] > history[0]["score"]


def test_lora_actor_trains_only_the_adapter_and_reference_stays_fixed(tiny_palm, target_fraction_reward):
    palm = tiny_palm()
    base = {k: v.clone() for k, v in palm.state_dict().items()}
    prompts = torch.randint(1, 16, (4, 3))
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=target_fraction_reward(TARGET),
        prompt_token_ids=prompts,
        actor_lr=1e-2,
        seed=0,
        use_tqdm=False,
        minibatch_size=4,
    )
    seq = torch.randint(1, 16, (2, 10))
    ref_before = palm.logprobs_of(seq, disable_lora=True)
    trainer.train(num_episodes=1, max_timesteps=4, update_timesteps=4, max_seq_len=10)
    for k, v in base.items():
        assert torch.equal(palm.state_dict()[k], v), k  # base weights untouched
    assert any(p.abs().sum() > 0 for n, p in palm.named_parameters() if ".B" in n and "actor" in n)
    torch.testing.assert_close(palm.logprobs_of(seq, disable_lora=True), ref_before)
    assert not torch.allclose(palm.logprobs_of(seq, finetune_scope="actor"), ref_before)


def test_generate_returns_the_best_scored_sample(tiny_palm, target_fraction_reward):
    palm = tiny_palm()
    prompt = torch.tensor([1, 7, 3])
    reward = target_fraction_reward(TARGET)
    trainer = RLHFTrainer(
        palm=palm, reward_model=reward, prompt_token_ids=prompt[None], seed=0, use_tqdm=False
    )
    best, scores = trainer.generate(19, prompt=prompt, num_samples=10, return_scores=True)
    assert best.dim() == 1 and len(best) == 16 and len(scores) == 10
    full = torch.cat([prompt, best])[None]
    pm = torch.zeros_like(full, dtype=torch.bool)
    pm[:, :3] = True
    best_score = reward(full, mask=torch.ones_like(pm), prompt_mask=pm).item()
    assert best_score == pytest.approx(scores.max().item())
    assert scores.max() > scores.min()  # 10 random samples of 16 tokens do differ


def test_trainer_save_and_load_restores_state(tiny_palm, target_fraction_reward, tmp_path):
    prompts = torch.randint(1, 16, (4, 3))

    def make():
        torch.manual_seed(0)
        return RLHFTrainer(
            palm=tiny_palm(),
            reward_model=target_fraction_reward(TARGET),
            prompt_token_ids=prompts,
            seed=0,
            use_tqdm=False,
            minibatch_size=4,
            actor_lr=1e-2,
        )

    a = make()
    a.train(num_episodes=1, max_timesteps=4, update_timesteps=4, max_seq_len=10)
    a.save(tmp_path / "state")
    b = make()
    b.load(tmp_path / "state")
    for (ka, va), (kb, vb) in zip(a.trainable_state_dict().items(), b.trainable_state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    sa, sb = a.actor_optim.state_dict()["state"], b.actor_optim.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"])
    assert b.num_updates == 1
    serving = a.policy_for_serving()
    seq = torch.randint(1, 16, (2, 8))
    torch.testing.assert_close(
        serving.logprobs_of(seq), a.palm.logprobs_of(seq, finetune_scope="actor"), atol=1e-5, rtol=1e-5
    )


def test_trainer_rejects_bad_arguments(tiny_palm, target_fraction_reward):
    with pytest.raises(ValueError, match="exactly one of prompts"):
        RLHFTrainer(palm=tiny_palm(), reward_model=target_fraction_reward(1))
    with pytest.raises(ValueError, match="algorithm"):
        RLHFTrainer(
            palm=tiny_palm(),
            reward_model=target_fraction_reward(1),
            prompt_token_ids=torch.ones(1, 2),
            algorithm="a2c",
        )


def test_text_prompts_rloo_and_spilled_experience(tiny_palm, target_fraction_reward, tmp_path):
    (tmp_path / "prompts.txt").write_text("hello\n\nhow are you\n")
    palm = tiny_palm(num_tokens=260)
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=target_fraction_reward(ord("a") + 4),
        prompts_path=str(tmp_path / "prompts.txt"),
        algorithm="rloo",
        group_size=3,
        memory_limit_bytes=2000,  # a few rows: forces the memmap path
        spill_dir=str(tmp_path / "spill"),
        seed=0,
        use_tqdm=False,
    )
    assert trainer.prompt_ids == [[1, *(b + 4 for b in b"hello")], [1, *(b + 4 for b in b"how are you")]]
    history = trainer.train(num_episodes=1, max_timesteps=4, update_timesteps=4, max_seq_len=20, eos_token=2)
    assert history[0]["rollouts"] == 12  # 4 timesteps x group of 3
    assert history[0]["spilled"] == 1.0
    assert not list((tmp_path / "spill").rglob("*.bin"))  # temporary files removed


@pytest.mark.parametrize("algorithm", ["grpo", "drgrpo"])
def test_constant_normalised_aggregation_trains(tiny_palm, target_fraction_reward, algorithm):
    """loss_aggregation="seq-mean-token-sum-norm" (Dr. GRPO): each response's token sum is
    divided by the generation budget, max_seq_len - prompt length; drgrpo also drops the
    division of the group advantages by their std."""
    from palm_rlhf.rl.update import policy_step

    palm = tiny_palm()
    prompts = torch.randint(1, 16, (4, 4))
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=target_fraction_reward(TARGET),
        prompt_token_ids=prompts,
        algorithm=algorithm,
        loss_aggregation="seq-mean-token-sum-norm" if algorithm == "grpo" else None,
        actor_lora=False,
        actor_lr=3e-3,
        minibatch_size=8,
        group_size=4,
        seed=0,
        use_tqdm=False,
    )
    assert trainer.update_cfg.aggregation == "seq-mean-token-sum-norm"
    assert trainer.scale_rewards_by_std == (algorithm == "grpo")
    before = {k: v.clone() for k, v in palm.state_dict().items()}
    history = trainer.train(num_episodes=2, max_timesteps=4, update_timesteps=4, max_seq_len=12, eos_token=2)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["policy_loss"])) for h in history)
    assert trainer.update_cfg.constant_normalizer == 12 - 4  # the generation budget
    assert any(not torch.equal(v, palm.state_dict()[k]) for k, v in before.items())

    # the advantages, and the loss of an on-policy step (ratio 1, so the surrogate is -A per token)
    params = [trainer._sampling_params(p, 12, 2, 1.0, 0, 1.0, 4) for p in trainer.prompt_ids[:2]]
    ro = trainer.make_experience(trainer.prompt_ids[:2], params)
    scores = ro.scores.view(-1, 4)
    centred = scores - scores.mean(1, keepdim=True)
    seq_adv = centred if algorithm == "drgrpo" else centred / (scores.std(1, keepdim=True) + 1e-6)
    mask = ro.action_mask
    torch.testing.assert_close(ro.advantages, seq_adv.reshape(-1, 1) * mask)
    batch = {"sequences": ro.sequences, "action_mask": mask, "old_logprobs": ro.old_logprobs,
             "advantages": ro.advantages, "ref_logprobs": ro.ref_logprobs}
    stats = policy_step(trainer.actor, torch.optim.SGD(trainer.actor.trainable_parameters(), lr=0.0), batch,
                        trainer.update_cfg)
    expected = -(seq_adv.reshape(-1) * mask.sum(1)).sum() / 8.0 / len(ro)
    assert stats["policy_loss"] == pytest.approx(float(expected), abs=1e-5)
