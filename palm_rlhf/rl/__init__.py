"""Reinforcement learning from human feedback: advantages and losses (:mod:`.losses`), an
experience buffer that spills to disk (:mod:`.buffer`), batched rollouts (:mod:`.rollout`),
the update step shared by one process and ``torchrun`` (:mod:`.update`), and
:class:`~palm_rlhf.rl.trainer.RLHFTrainer`."""

from palm_rlhf.rl.buffer import ExperienceBuffer
from palm_rlhf.rl.models import Actor, Critic
from palm_rlhf.rl.rollout import Rollout, pack_sequences, rollout
from palm_rlhf.rl.trainer import RLHFTrainer

__all__ = ["Actor", "Critic", "ExperienceBuffer", "RLHFTrainer", "Rollout", "pack_sequences", "rollout"]
