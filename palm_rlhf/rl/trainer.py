"""``RLHFTrainer``: PPO (or GRPO / Dr. GRPO / RLOO) fine-tuning of a PaLM against a reward model.

The constructor and ``train`` / ``generate`` follow palm-rlhf-pytorch's README:

    trainer = RLHFTrainer(palm=palm, reward_model=reward_model, prompt_token_ids=prompts)
    trainer.train(num_episodes=50000, max_timesteps=3, update_timesteps=4, max_seq_len=256)
    answer = trainer.generate(256, prompt=prompts[0], num_samples=10)  # best of 10

``train`` keeps the original's clock: each episode has ``max_timesteps`` timesteps; every
timestep samples one random prompt and one rollout of it (``group_size`` rollouts for the
critic-free algorithms); every ``update_timesteps`` timesteps the stored rollouts drive
``epochs`` epochs of minibatch updates and are then dropped. What differs is how the work is
done: rollouts waiting for the same update are sampled together in batches of up to
``max_batch_size`` rows with the KV cache (the policy does not change between two updates, so
this is the same distribution), old log-probs come from the sampler, and the reference is the
same PaLM with its LoRA switched off.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from palm_rlhf.generation import SamplingParams
from palm_rlhf.model import PaLM
from palm_rlhf.rl import losses as L
from palm_rlhf.rl.buffer import PPO_FIELDS, ExperienceBuffer, Field
from palm_rlhf.rl.models import Actor, Critic
from palm_rlhf.rl.rollout import Rollout, model_reward_fn, rollout
from palm_rlhf.rl.update import UpdateConfig, global_moments, policy_step, value_step, world, wrap_ddp

log = logging.getLogger(__name__)

ALGORITHMS = ("ppo", "grpo", "drgrpo", "rloo")
CONSTANT_NORM = "seq-mean-token-sum-norm"  # losses.aggregate's Dr. GRPO mode
# the trainer's experience: PPO's fields plus the policy's own log-probs (for the KL)
TRAINER_FIELDS = {**PPO_FIELDS, "policy_logprobs": Field(torch.float32)}


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a JSONL file of objects
    with a ``prompt`` field."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                obj = json.loads(line)
                if "prompt" not in obj:
                    raise ValueError(f"{path}:{i}: no 'prompt' field")
                out.append(str(obj["prompt"]))
        return out
    return [line for line in text.split("\n") if line.strip()]


def _tokenize_prompts(prompts: Sequence[str], tokenizer) -> list[list[int]]:
    if tokenizer is None:
        from palm_rlhf.chat import encode_prompt
        from palm_rlhf.tokenizer import ByteTokenizer

        tok = ByteTokenizer()
        return [encode_prompt(tok, p) for p in prompts]
    if hasattr(tokenizer, "encode"):
        bos = getattr(tokenizer, "bos_id", None)
        return [([bos] if bos is not None else []) + list(tokenizer.encode(p)) for p in prompts]
    ids = tokenizer(list(prompts))  # a callable, as in palm-rlhf-pytorch: list[str] -> ids
    if torch.is_tensor(ids):
        return [row.tolist() for row in ids]
    return [list(map(int, row)) for row in ids]


def _prompt_token_lists(prompts, prompts_path, prompt_token_ids, tokenizer, pad_value: int) -> list[list[int]]:
    """The prompts as token id lists, padding removed, from whichever form was given."""
    if prompts_path is not None:
        prompts = load_prompts(prompts_path)
    if prompts is not None:
        if len(prompts) == 0:
            raise ValueError("no prompts")
        token_lists = _tokenize_prompts(prompts, tokenizer)
    elif torch.is_tensor(prompt_token_ids):
        ids = prompt_token_ids.reshape(-1, prompt_token_ids.shape[-1]) if prompt_token_ids.dim() else None
        if ids is None:
            raise ValueError("prompt_token_ids must be (num_prompts, length)")
        token_lists = [row[row != pad_value].tolist() for row in ids]
    else:
        token_lists = [[int(t) for t in row if int(t) != pad_value] for row in prompt_token_ids]
    empty = [i for i, p in enumerate(token_lists) if not p]
    if empty:
        raise ValueError(f"prompts {empty[:5]} are empty after removing padding")
    return token_lists


class RLHFTrainer(nn.Module):
    """Fine-tune ``palm`` to maximise ``reward_model`` with a KL leash to the starting model.

    ``reward_model`` is a :class:`~palm_rlhf.reward.RewardModel` or any callable
    ``(sequences, mask=, prompt_mask=) -> (batch,)`` (a rule, or a client of a reward service);
    ``reward_fn`` may instead take a whole :class:`~palm_rlhf.rl.rollout.Rollout`.

    Main knobs (defaults as in palm-rlhf-pytorch where it has them):

    - ``algorithm``: ``"ppo"`` (actor-critic, GAE), ``"grpo"``, ``"drgrpo"`` or ``"rloo"``
      (critic-free, ``group_size`` samples per prompt). ``"drgrpo"`` is GRPO without its two
      biases (Liu et al. 2025, https://arxiv.org/abs/2503.20783): group advantages are not
      divided by the group's std and the loss is ``loss_aggregation="seq-mean-token-sum-norm"``;
    - ``loss_aggregation`` (see :func:`palm_rlhf.rl.losses.aggregate`; default ``token-mean``,
      or ``seq-mean-token-sum-norm`` for drgrpo, where each response's token sum is divided by
      ``loss_normalizer``: by default the generation budget of :meth:`train`, i.e. the most new
      tokens a response may have, ``max_seq_len`` minus the shortest prompt's length);
    - ``scale_rewards_by_std``: divide GRPO's group advantages by the group std (default True
      for grpo, False for drgrpo);
    - ``kl_div_loss_weight``: the KL coefficient beta against the frozen reference (here the
      usual RLHF penalty, in the per-token reward for PPO/RLOO and in the loss for GRPO);
      ``kl_target`` makes it adaptive (Ziegler et al. 2019); ``kl_estimator`` k1/k2/k3;
    - ``actor_lora`` / ``actor_finetune`` (``"lora"``, ``"last_n"``, ``"full"``);
    - ``critic``: a PaLM to use as the critic trunk (default: a copy of ``palm``);
    - ``eps_clip``, ``value_clip``, ``beta_s`` (entropy bonus), ``max_norm``, ``gamma``, ``lam``;
    - ``memory_limit_bytes`` / ``spill_dir``: when the experience spills to a memmap.
    """

    def __init__(
        self,
        *,
        palm: PaLM,
        reward_model: Callable | None = None,
        reward_fn: Callable[[Rollout], torch.Tensor] | None = None,
        prompts: Sequence[str] | None = None,
        prompts_path: str | None = None,
        prompt_token_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
        tokenizer=None,
        critic: PaLM | None = None,
        algorithm: str = "ppo",
        actor_lr: float = 1e-4,
        critic_lr: float = 1e-4,
        actor_wd: float = 0.0,
        critic_wd: float = 0.0,
        actor_lora: bool = True,
        critic_lora: bool = True,
        actor_lora_r: int = 8,
        critic_lora_r: int = 8,
        actor_finetune: str | None = None,
        actor_last_n_layers: int = 1,
        actor_dropout: float = 0.0,
        critic_dropout: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        max_norm: float | None = None,
        eps_clip: float = 0.2,
        value_clip: float | None = 0.4,
        beta_s: float = 0.01,
        pad_value: int = 0,
        minibatch_size: int = 16,
        epochs: int = 1,
        kl_div_loss_weight: float = 0.1,
        kl_estimator: str = "k1",
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        group_size: int = 4,
        scale_rewards_by_std: bool | None = None,
        loss_aggregation: str | None = None,
        loss_normalizer: float | None = None,
        memory_limit_bytes: int | None = 256 * 2**20,
        spill_dir: str | None = None,
        seed: int | None = None,
        use_tqdm: bool = True,
    ):
        super().__init__()
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of reward_model or reward_fn")
        given = sum(x is not None for x in (prompts, prompts_path, prompt_token_ids))
        if given != 1:
            raise ValueError("give exactly one of prompts, prompts_path or prompt_token_ids")
        if algorithm != "ppo" and group_size < 2:
            raise ValueError(f"{algorithm} compares samples of one prompt: group_size must be >= 2")
        L.kl_estimate(torch.zeros(1), torch.zeros(1), kl_estimator)  # validates the name
        if loss_aggregation is None:
            loss_aggregation = CONSTANT_NORM if algorithm == "drgrpo" else "token-mean"
        L.aggregate(torch.zeros(1, 1), torch.ones(1, 1), loss_aggregation, constant=1.0)  # validates it
        if loss_normalizer is not None and not loss_normalizer > 0:
            raise ValueError(f"loss_normalizer must be positive, got {loss_normalizer!r}")
        if scale_rewards_by_std is None:
            scale_rewards_by_std = algorithm != "drgrpo"

        self.pad_value = int(pad_value)
        token_lists = _prompt_token_lists(prompts, prompts_path, prompt_token_ids, tokenizer, self.pad_value)
        self.prompt_ids: list[list[int]] = token_lists
        self.num_prompts = len(token_lists)

        self.palm = palm
        self.palm.set_dropout(actor_dropout)
        self.algorithm = algorithm
        # the critic copies the trunk before the actor adapter exists
        self.critic: Critic | None = None
        if algorithm == "ppo":
            self.critic = Critic(
                critic if critic is not None else palm,
                lora=critic_lora,
                lora_r=critic_lora_r,
                dropout=critic_dropout,
            )
        finetune = actor_finetune or ("lora" if actor_lora else "full")
        self.actor = Actor(palm, finetune=finetune, lora_r=actor_lora_r, last_n_layers=actor_last_n_layers)
        self.reference = self.actor.make_reference()

        self.reward_model = reward_model
        if isinstance(reward_model, nn.Module):
            reward_model.eval()
            reward_model.requires_grad_(False)
        self._reward_fn = reward_fn or model_reward_fn(reward_model)

        self.actor_optim = torch.optim.AdamW(
            self.actor.trainable_parameters(), lr=actor_lr, weight_decay=actor_wd, betas=betas
        )
        self.critic_optim = None
        if self.critic is not None:
            self.critic_optim = torch.optim.AdamW(
                self.critic.trainable_parameters(), lr=critic_lr, weight_decay=critic_wd, betas=betas
            )
        self.actor_ddp = wrap_ddp(self.actor)
        self.critic_ddp = wrap_ddp(self.critic) if self.critic is not None else None

        self.update_cfg = UpdateConfig(
            clip_eps=eps_clip,
            value_clip=value_clip,
            entropy_coef=beta_s,
            max_norm=max_norm,
            aggregation=loss_aggregation,
            constant_normalizer=loss_normalizer,  # None: train() sets the generation budget
            kl_in_loss_coef=kl_div_loss_weight if algorithm in ("grpo", "drgrpo") else 0.0,
        )
        self.loss_normalizer = loss_normalizer
        self.kl_ctl = (
            L.AdaptiveKLController(kl_div_loss_weight, kl_target, kl_horizon)
            if kl_target is not None
            else L.FixedKLController(kl_div_loss_weight)
        )
        self.kl_estimator = kl_estimator
        self.gamma, self.lam = gamma, lam
        self.whiten_advantages = whiten_advantages
        self.group_size = group_size if algorithm != "ppo" else 1
        self.scale_rewards_by_std = scale_rewards_by_std
        self.minibatch_size = minibatch_size
        self.epochs = epochs
        self.memory_limit_bytes = memory_limit_bytes
        self.spill_dir = spill_dir
        rank, _ = world()
        self.seed = seed if seed is not None else random.randrange(2**31)
        self._rng = random.Random(self.seed + rank)
        self.use_tqdm = use_tqdm
        self.num_updates = 0
        self.history: list[dict[str, float]] = []  # one record per update
        self.buffer: ExperienceBuffer | None = None

    @property
    def device(self) -> torch.device:
        return self.palm.device

    def print(self, msg: str) -> None:
        if world()[0] == 0:
            print(msg)

    # -- rollouts -------------------------------------------------------------------------------

    def _sampling_params(
        self, prompt: Sequence[int], max_seq_len: int, eos_token, temperature, top_k, top_p, n
    ):
        return SamplingParams(
            max_new_tokens=max(1, max_seq_len - len(prompt)),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_token_ids=(eos_token,) if eos_token is not None else (),
            n=n,
        )

    def _ref_logprobs(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.actor.reference_logprobs(self.reference, seq)

    @torch.no_grad()
    def _values(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.critic(seq)

    @torch.no_grad()
    def make_experience(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Rollout:
        """Sample rollouts and fill in reference log-probs, values, scores, per-token rewards,
        advantages and returns (the latter three as extra attributes on the Rollout)."""
        self.palm.eval()
        if self.critic is not None:
            self.critic.eval()
        ro = rollout(
            self.palm,
            prompts,
            params,
            finetune_scope=self.actor.scope,
            ref_logprobs_fn=self._ref_logprobs,
            reward_fn=self._reward_fn,
            value_fn=self._values if self.critic is not None else None,
            pad_id=self.pad_value,
        )
        mask = ro.action_mask
        # the leash compares the policy's own (temperature-1) log-probs with the reference's
        own = ro.policy_logprobs if ro.policy_logprobs is not None else ro.old_logprobs
        kl = L.kl_estimate(own, ro.ref_logprobs, self.kl_estimator) * mask
        ro.kl = kl  # type: ignore[attr-defined]
        if self.algorithm == "ppo":
            rewards = L.kl_penalized_rewards(ro.scores, kl, mask, self.kl_ctl.value)
            adv, ret = L.gae(rewards, ro.values, mask, self.gamma, self.lam)
        else:
            n = self.group_size
            seq_rewards = ro.scores.view(-1, n)  # (prompts, group): rows of one prompt are adjacent
            if self.algorithm == "rloo":
                seq_rewards = seq_rewards - self.kl_ctl.value * L.masked_sum(kl, mask, dim=1).view(-1, n)
                adv_seq = L.rloo_advantages(seq_rewards)
            else:
                adv_seq = L.grpo_advantages(seq_rewards, scale_by_std=self.scale_rewards_by_std)
            adv = adv_seq.reshape(-1, 1) * mask
            rewards = torch.zeros_like(kl)
            ret = torch.zeros_like(kl)
            ro.values = torch.zeros_like(kl)
        ro.rewards, ro.advantages, ro.returns = rewards, adv, ret  # type: ignore[attr-defined]
        return ro

    def _store(self, ro: Rollout) -> None:
        self.buffer.add(
            sequences=ro.sequences,
            attention_mask=ro.attention_mask,
            action_mask=ro.action_mask,
            old_logprobs=ro.old_logprobs,
            policy_logprobs=ro.policy_logprobs if ro.policy_logprobs is not None else ro.old_logprobs,
            ref_logprobs=ro.ref_logprobs,
            values=ro.values,
            rewards=ro.rewards,
            advantages=ro.advantages,
            returns=ro.returns,
            scores=ro.scores,
        )

    # -- learning -------------------------------------------------------------------------------

    def learn(self, buffer: ExperienceBuffer | None = None) -> dict[str, float]:
        """``epochs`` epochs of minibatch PPO/GRPO/RLOO updates over the stored experience."""
        buf = buffer or self.buffer
        if buf is None or len(buf) == 0:
            raise ValueError("no experience to learn from")
        if self.update_cfg.aggregation == CONSTANT_NORM and self.update_cfg.constant_normalizer is None:
            raise ValueError(
                f"{CONSTANT_NORM} needs a constant normaliser: pass loss_normalizer= to the trainer "
                "or call train(), which uses the generation budget"
            )
        mask = buf.get("action_mask")
        own = buf.get("policy_logprobs" if "policy_logprobs" in buf.fields else "old_logprobs")
        kl_tokens = L.masked_sum(L.kl_estimate(own, buf.get("ref_logprobs"), "k1"), mask)
        scores = buf.get("scores")
        if self.algorithm == "ppo" and self.whiten_advantages:
            adv = buf.get("advantages")
            buf.set("advantages", L.masked_whiten(adv, mask, moments=global_moments(adv, mask)))
        self.palm.train()
        if self.critic is not None:
            self.critic.train()
        sums: dict[str, float] = {}
        count = 0
        for epoch in range(self.epochs):
            seed = self.seed * 7919 + self.num_updates * 131 + epoch
            for mb in buf.minibatches(self.minibatch_size, seed=seed, device=self.device):
                stats = policy_step(self.actor_ddp, self.actor_optim, mb, self.update_cfg)
                if self.critic_ddp is not None:
                    stats.update(value_step(self.critic_ddp, self.critic_optim, mb, self.update_cfg))
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        self.palm.eval()
        record = {k: v / max(count, 1) for k, v in sums.items()}
        n_seq = len(buf)
        mean_kl = float(kl_tokens) / max(n_seq, 1)  # k1 KL per sequence
        record.update(
            score=float(scores.mean()),
            kl=mean_kl,
            kl_coef=self.kl_ctl.value,
            rollouts=n_seq,
            spilled=float(buf.spilled),
        )
        self.kl_ctl.update(mean_kl, n_seq)
        self.num_updates += 1
        self.history.append(record)
        return record

    def train(
        self,
        num_episodes: int = 50000,
        max_timesteps: int = 500,
        update_timesteps: int = 5000,
        max_batch_size: int = 16,
        max_seq_len: int = 2048,
        eos_token: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> list[dict[str, float]]:
        """Run ``num_episodes`` episodes of ``max_timesteps`` timesteps, updating every
        ``update_timesteps`` timesteps (see the module docstring). ``max_seq_len`` bounds
        prompt + response; ``eos_token`` ends a response early (and is part of it).
        ``max_batch_size`` is the number of rows sampled together. ``temperature`` / ``top_k`` /
        ``top_p`` shape the sampled distribution; the updates take their new log-probs under the
        same transform, so the PPO ratio compares like with like. Returns the update history."""
        if update_timesteps < 1 or max_timesteps < 1 or num_episodes < 0:
            raise ValueError("num_episodes >= 0, max_timesteps >= 1 and update_timesteps >= 1 are required")
        if not temperature > 0:
            raise ValueError(f"RL updates need sampled rollouts: temperature > 0, not {temperature!r}")
        longest = max(len(p) for p in self.prompt_ids)
        shortest = min(len(p) for p in self.prompt_ids)
        self.update_cfg.temperature, self.update_cfg.top_k, self.update_cfg.top_p = temperature, top_k, top_p
        if self.loss_normalizer is None:
            # the generation budget: the most new tokens any response of this run may have
            self.update_cfg.constant_normalizer = float(max(1, max_seq_len - shortest))
        self.buffer = ExperienceBuffer(
            max_len=max(max_seq_len, longest + 1),
            fields=TRAINER_FIELDS,
            max_memory_bytes=self.memory_limit_bytes,
            spill_dir=self.spill_dir,
        )
        prompts_per_batch = max(1, max_batch_size // self.group_size)
        time = 0
        pending: list[int] = []
        episodes = range(num_episodes)
        bar = None
        if self.use_tqdm and world()[0] == 0:
            from tqdm.auto import tqdm

            bar = tqdm(episodes, desc="episodes")
            episodes = bar
        try:
            for _ in episodes:
                for _ in range(max_timesteps):
                    time += 1
                    pending.append(self._rng.randrange(self.num_prompts))
                    at_update = time % update_timesteps == 0
                    if len(pending) >= prompts_per_batch or at_update:
                        prompts = [self.prompt_ids[i] for i in pending]
                        params = [
                            self._sampling_params(
                                p, max_seq_len, eos_token, temperature, top_k, top_p, self.group_size
                            )
                            for p in prompts
                        ]
                        self._store(self.make_experience(prompts, params))
                        pending = []
                    if at_update:
                        record = self.learn()
                        self.buffer.clear()
                        if bar is not None:
                            bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
                        log.debug("update %d: %s", self.num_updates, record)
        finally:
            self.buffer.close()
        return self.history

    # -- best-of-n ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        max_seq_len: int,
        *args,
        prompt: torch.Tensor,
        num_samples: int = 4,
        temperature: float = 1.0,
        eos_token: int | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        return_scores: bool = False,
    ):
        """Sample ``num_samples`` responses to one prompt (1-D tensor) in one batched call and
        return the one the reward model scores highest: a 1-D tensor of response tokens (and
        the scores of all samples with ``return_scores``). ``max_seq_len`` bounds
        prompt + response, as in ``PaLM.generate``."""
        if prompt.dim() != 1:
            raise ValueError("prompt must be a 1-D tensor of token ids (one prompt at a time)")
        ids = prompt.tolist()
        params = self._sampling_params(ids, max_seq_len, eos_token, temperature, top_k, top_p, num_samples)
        self.palm.eval()
        ro = rollout(
            self.palm,
            [ids],
            params,
            finetune_scope=self.actor.scope,
            reward_fn=self._reward_fn,
            pad_id=self.pad_value,
        )
        best = int(ro.scores.argmax())
        out = torch.tensor(ro.responses[best], dtype=torch.long, device=prompt.device)
        return (out, ro.scores) if return_scores else out

    # -- persistence ----------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes: the actor's trainable weights and the critic (if any)."""
        out = {f"actor.{n}": p.detach() for n, p in self.palm.named_parameters() if p.requires_grad}
        if self.critic is not None:
            out.update({f"critic.{k}": v for k, v in self.critic.state_dict().items()})
        return out

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Write the trainable state (safetensors checkpoint folder) and the optimisers next to
        it (``<path>.actor-optim.safetensors`` / ``<path>.critic-optim.safetensors``)."""
        from palm_rlhf.checkpoint import save_checkpoint
        from palm_rlhf.rl.state import save_optimizer

        path = Path(path)
        save_optimizer(self.actor_optim, path.with_name(path.name + ".actor-optim.safetensors"))
        if self.critic_optim is not None:
            save_optimizer(self.critic_optim, path.with_name(path.name + ".critic-optim.safetensors"))
        meta = {
            "trainer": {
                "algorithm": self.algorithm,
                "num_updates": self.num_updates,
                "kl_coef": self.kl_ctl.value,
            }
        }
        meta.update(metadata or {})
        return save_checkpoint(
            path, self.trainable_state_dict(), self.palm.config, kind="rlhf-trainer", metadata=meta
        )

    def load(self, path: str | Path) -> dict:
        """Restore what :meth:`save` wrote; returns the checkpoint's metadata."""
        from palm_rlhf.checkpoint import load_checkpoint
        from palm_rlhf.rl.state import load_optimizer

        path = Path(path)
        state, manifest = load_checkpoint(path, device=self.device)
        actor = {k[len("actor.") :]: v for k, v in state.items() if k.startswith("actor.")}
        params = dict(self.palm.named_parameters())
        missing = [k for k in actor if k not in params]
        if missing:
            raise KeyError(f"checkpoint has actor weights this model lacks: {missing[:5]}")
        with torch.no_grad():
            for k, v in actor.items():
                params[k].copy_(v)
        if self.critic is not None:
            self.critic.load_state_dict(
                {k[len("critic.") :]: v for k, v in state.items() if k.startswith("critic.")}
            )
        load_optimizer(self.actor_optim, path.with_name(path.name + ".actor-optim.safetensors"))
        if self.critic_optim is not None:
            load_optimizer(self.critic_optim, path.with_name(path.name + ".critic-optim.safetensors"))
        meta = manifest.get("metadata", {})
        info = meta.get("trainer", {})
        self.num_updates = int(info.get("num_updates", 0))
        self.kl_ctl.value = float(info.get("kl_coef", self.kl_ctl.value))
        return meta

    def policy_for_serving(self) -> PaLM:
        """A standalone copy of the policy with the actor adapter merged into the weights."""
        import copy

        palm = copy.deepcopy(self.palm)
        if self.actor.scope is not None:
            palm.merge_finetune_params(self.actor.scope)
        for scope in list(palm.finetune_modules):
            palm.remove_finetune_params(scope)
        palm.requires_grad_(False)
        return palm.eval()
