"""Runs PPO update steps on a fixed experience set, in one process or under torchrun.

Every process builds the same tiny actor/critic and experience (seeded), wraps the models in
DDP and trains on its shard of each global minibatch; the final weights go to
``<out>/rank<r>.safetensors``. Run directly (one process) it is the reference run.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from palm_rlhf import PaLM
from palm_rlhf.rl.buffer import ExperienceBuffer
from palm_rlhf.rl.models import Actor, Critic
from palm_rlhf.rl.rollout import pack_sequences
from palm_rlhf.rl.update import UpdateConfig, ppo_update_step, world, wrap_ddp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--finetune", default="lora")
    args = ap.parse_args()
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, size = world()
    torch.manual_seed(0)
    palm = PaLM(num_tokens=16, dim=32, depth=2, dim_head=16, heads=2, max_seq_len=64)
    critic = Critic(palm)
    actor = Actor(palm, finetune=args.finetune)
    with torch.no_grad():  # make the adapter non-trivial so LoRA gradients reach both factors
        for p in actor.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    gen = torch.Generator().manual_seed(1)
    n = 12
    prompts = [
        torch.randint(1, 16, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]
    resps = [
        torch.randint(1, 16, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]
    p = pack_sequences(prompts, resps)
    with torch.no_grad():
        old = palm.logprobs_of(p["sequences"], finetune_scope=actor.scope) * p["action_mask"]
        values = critic(p["sequences"]) * p["action_mask"]
    m = p["action_mask"]
    buf = ExperienceBuffer(max_len=p["sequences"].shape[1])
    buf.add(
        sequences=p["sequences"],
        attention_mask=p["attention_mask"],
        action_mask=m,
        old_logprobs=old,
        ref_logprobs=old,
        values=values,
        rewards=torch.zeros_like(old),
        advantages=torch.randn(m.shape, generator=gen) * m,
        returns=torch.randn(m.shape, generator=gen) * m,
        scores=torch.zeros(n),
    )
    if rank == 0:
        init = {f"actor.{k}": v.detach().clone() for k, v in palm.state_dict().items()}
        init.update({f"critic.{k}": v.detach().clone() for k, v in critic.state_dict().items()})
        save_file(init, os.path.join(args.out, "init.safetensors"))
    actor_ddp, critic_ddp = wrap_ddp(actor), wrap_ddp(critic)
    a_opt = torch.optim.AdamW(actor.trainable_parameters(), lr=1e-2)
    c_opt = torch.optim.AdamW(critic.trainable_parameters(), lr=1e-2)
    cfg = UpdateConfig(entropy_coef=0.01, max_norm=1.0)
    for epoch in range(2):
        for mb in buf.minibatches(6, seed=epoch, shard=(rank, size)):
            ppo_update_step(actor_ddp, critic_ddp, a_opt, c_opt, mb, cfg)
    state = {f"actor.{k}": v.detach().clone() for k, v in palm.state_dict().items()}
    state.update({f"critic.{k}": v.detach().clone() for k, v in critic.state_dict().items()})
    save_file(state, os.path.join(args.out, f"rank{rank}.safetensors"))
    if size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
