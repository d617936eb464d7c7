"""``palm-rlhf pretrain | sft | train-reward | ppo``: the offline training pipeline.

Every command writes numbered checkpoints into ``OUT/checkpoints/<kind>/vNNNN`` (the layout the
services read from their ``--data-dir``), the optimiser state as safetensors beside them, and
resumes from the newest complete pair with ``--resume``. The data each step sees is drawn from
a generator seeded with ``(seed, step)``, so a resumed run continues exactly where an
uninterrupted one would have been.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path


def _float32():
    import torch

    return torch.float32  # training and stored bfloat16 weights: compute in float32 on load

log = logging.getLogger("palm_rlhf.rl.cli")


def _common(p: argparse.ArgumentParser, *, steps: int, lr: float, batch: int) -> None:
    p.add_argument("--out", required=True, help="output folder (checkpoints under OUT/checkpoints/<kind>/)")
    p.add_argument("--steps", type=int, default=steps, help=f"total optimisation steps (default {steps})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    p.add_argument("--batch-size", type=int, default=batch, help=f"sequences per step (default {batch})")
    p.add_argument("--seed", type=int, default=0, help="seed of data sampling and initialisation")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="steps between checkpoints (the last step always saves)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _model_source(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--init", help="start from this checkpoint folder instead of a fresh model")
    p.add_argument(
        "--preset", default=default_preset, help=f"config preset of a fresh model (default {default_preset})"
    )


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="next-token pretraining on a text file (byte tokenizer)")
    p.add_argument("--data", required=True, help="UTF-8 text file")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training window")
    _model_source(p, "demo")
    _common(p, steps=1000, lr=3e-4, batch=16)
    p.set_defaults(func=cmd_pretrain)

    p = subparsers.add_parser("sft", help='supervised fine-tuning on JSONL {"prompt", "response"}')
    p.add_argument("--data", required=True, help='JSONL of {"prompt": ..., "response": ...}')
    p.add_argument("--max-len", type=int, default=256, help="truncate prompt + response to this many tokens")
    _model_source(p, "demo")
    _common(p, steps=500, lr=1e-4, batch=16)
    p.set_defaults(func=cmd_sft)

    p = subparsers.add_parser(
        "train-reward",
        help='reward model on JSONL {"prompt","chosen","rejected"} and/or {"prompt","response","rating"}',
    )
    p.add_argument("--data", required=True, help="JSONL of preference pairs and/or rated responses")
    p.add_argument("--max-len", type=int, default=256, help="truncate prompt + response to this many tokens")
    p.add_argument("--lora-r", type=int, default=8, help="rank of the reward LoRA scope")
    p.add_argument("--full", action="store_true", help="fine-tune the whole trunk instead of a LoRA scope")
    p.add_argument("--rating-weight", type=float, default=1.0, help="weight of the rating regression loss")
    _model_source(p, "demo")
    _common(p, steps=500, lr=1e-4, batch=16)
    p.set_defaults(func=cmd_train_reward)

    p = subparsers.add_parser("ppo", help="RLHF of a policy checkpoint against a reward checkpoint")
    p.add_argument("--policy", required=True, help="policy checkpoint folder")
    p.add_argument("--reward", required=True, help="reward model checkpoint folder")
    p.add_argument("--prompts", required=True, help="prompts: text (one per line) or JSONL with 'prompt'")
    p.add_argument("--algorithm", choices=("ppo", "grpo", "drgrpo", "rloo"), default="ppo")
    p.add_argument("--update-timesteps", type=int, default=16, help="rollouts (prompts) per update")
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt for grpo/rloo")
    p.add_argument("--epochs", type=int, default=1, help="passes over the rollouts per update")
    p.add_argument("--max-seq-len", type=int, default=128, help="prompt + response length bound")
    p.add_argument("--kl", type=float, default=0.1, help="KL coefficient against the reference")
    p.add_argument(
        "--kl-target", type=float, default=None, help="adaptive KL target (fixed coefficient if unset)"
    )
    p.add_argument("--critic-lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--chat", action="store_true", help="wrap each prompt in the chat format (User: ...\\nAssistant:)"
    )
    _common(p, steps=100, lr=1e-4, batch=16)
    p.set_defaults(func=cmd_ppo)


# --- shared machinery -------------------------------------------------------------------------


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _step_generator(seed: int, step: int):
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class _Run:
    """Checkpoints, optimiser files and the resume point of one command."""

    def __init__(self, args, kind: str, command: str):
        from palm_rlhf.checkpoint import CheckpointStore

        self.args = args
        self.out = Path(args.out)
        self.store = CheckpointStore(self.out / "checkpoints", kind)
        self.optim_dir = self.out / "optimizer" / kind
        self.kind = kind
        self.command = command
        self.last_version: str | None = None

    def optim_path(self, version: str) -> Path:
        return self.optim_dir / f"{version}.safetensors"

    def resume_point(self) -> tuple[str, Path, int] | None:
        """(version, checkpoint path, step) of the newest checkpoint with its optimiser state."""
        for v in reversed(self.store.versions()):
            meta = self.store.manifest(v).get("metadata", {})
            if meta.get("command") == self.command and "step" in meta and self.optim_path(v).is_file():
                return v, self.store.path(v), int(meta["step"])
        return None

    def save(self, model, config, optimizers: dict, step: int, metadata: dict | None = None) -> str:
        from palm_rlhf.rl.state import save_optimizer

        version = self.store.next_version()
        for name, opt in optimizers.items():  # optimiser files first: a version only counts with them
            path = (
                self.optim_path(version)
                if name == "main"
                else self.optim_dir / f"{version}.{name}.safetensors"
            )
            save_optimizer(opt, path, {"step": step})
        meta = {"command": self.command, "step": step, "seed": self.args.seed, **(metadata or {})}
        self.store.save(model, config, parent=self.last_version or self.store.current(), metadata=meta)
        self.last_version = version
        log.info("saved %s %s at step %d", self.kind, version, step)
        return version


def _progress(args, start: int, total: int, desc: str):
    rng = range(start, total)
    if args.no_progress:
        return rng
    from tqdm.auto import tqdm

    return tqdm(rng, desc=desc, initial=start, total=total, unit="step")


def _load_or_build_palm(args, device):
    from palm_rlhf.checkpoint import load_palm
    from palm_rlhf.config import PaLMConfig
    from palm_rlhf.model import PaLM

    if args.init:
        palm, _ = load_palm(args.init, device=device, dtype=_float32())
        for scope in list(palm.finetune_modules):  # adapters of an earlier stage are folded in
            palm.merge_finetune_params(scope)
        return palm
    return PaLM(PaLMConfig.from_name(args.preset)).to(device)


def _check_args(args) -> None:
    for name in ("steps", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")


def _read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{i}: invalid JSON: {e}") from e
    if not rows:
        raise SystemExit(f"{path}: no records")
    return rows


def _train_loop(
    args, run: _Run, model, config, optim, loss_fn, start: int, desc: str, save_model=None
) -> int:
    """The common step loop: seeded per-step data, progress bar, periodic checkpoints."""
    import torch

    bar = _progress(args, start, args.steps, desc)
    loss_val = float("nan")
    for step in bar:
        torch.manual_seed(args.seed * 1_000_003 + step)  # dropout etc. reproducible on resume
        model.train()
        loss = loss_fn(_step_generator(args.seed, step))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optim.param_groups for p in g["params"]], 1.0)
        optim.step()
        loss_val = float(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_val:.4f}")
        done = step + 1
        if done % args.checkpoint_every == 0 or done == args.steps:
            model.eval()
            run.save(save_model or model, config, {"main": optim}, done, {"loss": loss_val})
    if not args.no_progress and hasattr(bar, "close"):
        bar.close()
    print(
        json.dumps(
            {
                "command": run.command,
                "steps": args.steps,
                "loss": loss_val,
                "checkpoint": str(run.store.path(run.store.current())),
            }
        )
    )
    return 0


def _resume_palm(run: _Run, args, device):
    """(palm, optimizer state path, start step) from the newest checkpoint, or a fresh start."""
    from palm_rlhf.checkpoint import load_palm

    point = run.resume_point() if args.resume else None
    if point is None:
        if args.resume:
            log.warning("nothing to resume in %s: starting fresh", run.store.root)
        return _load_or_build_palm(args, device), None, 0
    version, path, step = point
    palm, _ = load_palm(path, device=device, dtype=_float32())
    run.last_version = version
    log.info("resuming from %s (step %d)", version, step)
    return palm, run.optim_path(version), step


# --- pretrain ---------------------------------------------------------------------------------


def cmd_pretrain(args) -> int:
    import torch

    from palm_rlhf.rl.state import load_optimizer
    from palm_rlhf.tokenizer import ByteTokenizer

    _check_args(args)
    device = _device(args.device)
    tok = ByteTokenizer()
    data = torch.tensor(tok.encode(Path(args.data).read_text(encoding="utf-8")), dtype=torch.long)
    if len(data) < args.seq_len + 2:
        raise SystemExit(
            f"{args.data} has {len(data)} tokens: need more than --seq-len + 1 = {args.seq_len + 1}"
        )
    run = _Run(args, "policy", "pretrain")
    torch.manual_seed(args.seed)
    palm, optim_path, start = _resume_palm(run, args, device)
    palm.requires_grad_(True)
    optim = torch.optim.AdamW(palm.parameters(), lr=args.lr, weight_decay=0.0)
    if optim_path is not None:
        load_optimizer(optim, optim_path)

    def loss_fn(gen):
        # random windows of seq_len + 1 tokens: inputs and shifted targets
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([data[s : s + args.seq_len + 1] for s in starts.tolist()]).to(device)
        return palm(batch, return_loss=True)

    return _train_loop(args, run, palm, palm.config, optim, loss_fn, start, "pretrain")


# --- sft --------------------------------------------------------------------------------------


def _encode_pairs(
    rows: list[dict], max_len: int, fields=("prompt", "response")
) -> list[tuple[list[int], list[int]]]:
    from palm_rlhf.chat import encode_prompt
    from palm_rlhf.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    out = []
    for i, r in enumerate(rows):
        if not all(f in r for f in fields):
            raise SystemExit(f"record {i + 1} lacks one of {list(fields)}")
        prompt = encode_prompt(tok, str(r[fields[0]]))
        response = tok.encode(str(r[fields[1]])) + [tok.eos_id]
        if len(prompt) >= max_len:
            prompt = prompt[: max_len // 2]
        response = response[: max_len - len(prompt)]
        out.append((prompt, response))
    return out


def _sample(n: int, k: int, gen) -> list[int]:
    import torch

    return torch.randint(0, n, (k,), generator=gen).tolist()


def cmd_sft(args) -> int:
    import torch

    from palm_rlhf.rl.rollout import pack_sequences
    from palm_rlhf.rl.state import load_optimizer

    _check_args(args)
    device = _device(args.device)
    pairs = _encode_pairs(_read_jsonl(args.data), args.max_len)
    run = _Run(args, "policy", "sft")
    torch.manual_seed(args.seed)
    palm, optim_path, start = _resume_palm(run, args, device)
    palm.requires_grad_(True)
    optim = torch.optim.AdamW(palm.parameters(), lr=args.lr, weight_decay=0.0)
    if optim_path is not None:
        load_optimizer(optim, optim_path)

    def loss_fn(gen):
        idx = _sample(len(pairs), args.batch_size, gen)
        b = pack_sequences([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], device=device)
        # loss on response tokens only: the prompt is context, not a target
        logp = palm.logprobs_of(b["sequences"])
        m = b["action_mask"].float()
        return -(logp * m).sum() / m.sum().clamp(min=1)

    return _train_loop(args, run, palm, palm.config, optim, loss_fn, start, "sft")


# --- reward model -----------------------------------------------------------------------------


def cmd_train_reward(args) -> int:
    import torch

    from palm_rlhf.reward import RewardModel, bradley_terry_loss
    from palm_rlhf.rl.rollout import pack_sequences
    from palm_rlhf.rl.state import load_optimizer

    _check_args(args)
    device = _device(args.device)
    rows = _read_jsonl(args.data)
    pref_rows = [r for r in rows if "chosen" in r and "rejected" in r]
    rated_rows = [r for r in rows if "rating" in r and "response" in r]
    if not pref_rows and not rated_rows:
        raise SystemExit(
            f'{args.data}: no {{"prompt","chosen","rejected"}} or {{"prompt","response","rating"}} records'
        )
    chosen = _encode_pairs(pref_rows, args.max_len, ("prompt", "chosen"))
    rejected = _encode_pairs(pref_rows, args.max_len, ("prompt", "rejected"))
    rated = _encode_pairs(rated_rows, args.max_len, ("prompt", "response"))
    ratings = torch.tensor([float(r["rating"]) for r in rated_rows])
    rating_mean = float(ratings.mean()) if len(ratings) else 0.0  # regression target: rating - mean

    run = _Run(args, "reward", "train-reward")
    torch.manual_seed(args.seed)
    point = run.resume_point() if args.resume else None
    if point is not None:
        version, path, start = point
        rm, _ = RewardModel.from_checkpoint(path, device=device)
        run.last_version = version
        optim_path = run.optim_path(version)
    else:
        palm = _load_or_build_palm(args, device)
        rm = RewardModel(palm, dropout=0.0, use_lora=not args.full, lora_r=args.lora_r, copy_palm=False).to(
            device
        )
        start, optim_path = 0, None
    rm.requires_grad_(False)
    params = rm.finetune_parameters()
    for p in params:
        p.requires_grad_(True)
    optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    if optim_path is not None:
        load_optimizer(optim, optim_path)

    def score(pairs, idx):
        b = pack_sequences([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], device=device)
        return rm(b["sequences"], mask=b["attention_mask"], prompt_mask=b["prompt_mask"])

    def loss_fn(gen):
        loss = torch.zeros((), device=device)
        if chosen:
            idx = _sample(len(chosen), args.batch_size, gen)
            loss = loss + bradley_terry_loss(score(chosen, idx), score(rejected, idx))  # Bradley-Terry
        if rated:
            idx = _sample(len(rated), args.batch_size, gen)
            target = (ratings[idx] - rating_mean).to(device)
            loss = loss + args.rating_weight * torch.nn.functional.mse_loss(score(rated, idx), target)
        return loss

    # every reward checkpoint carries the head metadata RewardModel.from_checkpoint needs
    orig_save = run.save

    def save_with_head(model, config, optimizers, step, metadata=None):
        return orig_save(
            model,
            config,
            optimizers,
            step,
            {**(metadata or {}), "reward_head": rm.head_config(), "rating_mean": rating_mean},
        )

    run.save = save_with_head  # type: ignore[method-assign]
    return _train_loop(args, run, rm, rm.palm.config, optim, loss_fn, start, "train-reward")


# --- ppo --------------------------------------------------------------------------------------


def cmd_ppo(args) -> int:
    import torch

    from palm_rlhf.chat import format_chat
    from palm_rlhf.checkpoint import load_palm
    from palm_rlhf.reward import RewardModel
    from palm_rlhf.rl.trainer import RLHFTrainer, load_prompts
    from palm_rlhf.tokenizer import ByteTokenizer

    _check_args(args)
    device = _device(args.device)
    torch.manual_seed(args.seed)
    palm, _ = load_palm(args.policy, device=device, dtype=_float32())
    for scope in list(palm.finetune_modules):
        palm.merge_finetune_params(scope)
    reward_model, _ = RewardModel.from_checkpoint(args.reward, device=device)
    prompts = load_prompts(args.prompts)
    if args.chat:
        prompts = [format_chat([{"role": "user", "content": p}]) for p in prompts]
    tok = ByteTokenizer()
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=reward_model,
        prompts=prompts,
        algorithm=args.algorithm,
        group_size=args.group_size,
        actor_lr=args.lr,
        critic_lr=args.critic_lr,
        minibatch_size=args.batch_size,
        epochs=args.epochs,
        kl_div_loss_weight=args.kl,
        kl_target=args.kl_target,
        seed=args.seed,
        use_tqdm=False,
    )
    run = _Run(args, "policy", "ppo")
    state_dir = Path(args.out) / "ppo-state"
    start = 0
    if args.resume:
        done = sorted(p for p in state_dir.glob("step-*") if p.is_dir() and (p / "manifest.json").is_file())
        done = [p for p in done if p.with_name(p.name + ".actor-optim.safetensors").is_file()]
        if done:
            meta = trainer.load(done[-1])
            start = int(meta.get("step", 0))
            log.info("resuming PPO from %s (step %d)", done[-1], start)
        else:
            log.warning("nothing to resume in %s: starting fresh", state_dir)
    bar = _progress(args, start, args.steps, f"{args.algorithm} updates")
    record: dict = {}
    for step in bar:
        torch.manual_seed(args.seed * 1_000_003 + step)
        trainer._rng = random.Random(args.seed * 1_000_003 + step)
        hist = trainer.train(
            num_episodes=1,
            max_timesteps=args.update_timesteps,
            update_timesteps=args.update_timesteps,
            max_batch_size=max(args.batch_size, args.group_size),
            max_seq_len=args.max_seq_len,
            eos_token=tok.eos_id,
            temperature=args.temperature,
        )
        record = hist[-1]
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
        done_steps = step + 1
        if done_steps % args.checkpoint_every == 0 or done_steps == args.steps:
            name = f"step-{done_steps:08d}"
            if not (state_dir / name).exists():
                trainer.save(state_dir / name, metadata={"step": done_steps})
            serving = trainer.policy_for_serving()
            run.store.save(
                serving,
                serving.config,
                parent=run.last_version or run.store.current(),
                metadata={
                    "command": "ppo",
                    "step": done_steps,
                    "score": record.get("score"),
                    "kl": record.get("kl"),
                },
            )
            run.last_version = run.store.current()
    if hasattr(bar, "close"):
        bar.close()
    print(json.dumps({"command": "ppo", "steps": args.steps, **{k: record.get(k) for k in ("score", "kl")}}))
    return 0
