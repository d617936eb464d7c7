"""RLHF throughput: this library's RLHFTrainer against palm-rlhf-pytorch's, same work, one run.

Both trainers get the same model shape, the same prompts, the same number of rollouts of the
same length (no EOS, so every response is ``max_seq_len - prompt_len`` tokens), one PPO update
over all of them with the same epochs and minibatch size. Reported: wall time, rollouts per
second (updates included) and the speed-up. Usage::

    python bench/rlhf.py                    # the default configuration
    python bench/rlhf.py --dim 256 --depth 4 --rollouts 32 --max-seq-len 128
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def _prompts(num: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (num, length), generator=gen)  # no pad id inside


def run_ours(args, prompts: torch.Tensor) -> float:
    from palm_rlhf import PaLM, RewardModel, RLHFTrainer

    torch.manual_seed(args.seed)
    palm = PaLM(
        num_tokens=args.vocab,
        dim=args.dim,
        depth=args.depth,
        dim_head=args.dim_head,
        heads=args.heads,
        max_seq_len=max(args.max_seq_len, 64),  # KV-cache bound
    )
    reward = RewardModel(palm, num_binned_output=0)
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=reward,
        prompt_token_ids=prompts,
        minibatch_size=args.minibatch_size,
        epochs=args.epochs,
        seed=args.seed,
        use_tqdm=False,
    )
    t0 = time.perf_counter()
    trainer.train(
        num_episodes=1,
        max_timesteps=args.rollouts,
        update_timesteps=args.rollouts,
        max_batch_size=args.rollouts,
        max_seq_len=args.max_seq_len,
    )
    return time.perf_counter() - t0


def run_original(args, prompts: torch.Tensor) -> float:
    from palm_rlhf_pytorch import PaLM, RewardModel, RLHFTrainer

    torch.manual_seed(args.seed)
    palm = PaLM(
        num_tokens=args.vocab, dim=args.dim, depth=args.depth, dim_head=args.dim_head, heads=args.heads
    )
    reward = RewardModel(palm, num_binned_output=0)
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=reward,
        prompt_token_ids=prompts,
        minibatch_size=args.minibatch_size,
        epochs=args.epochs,
    )
    sink = io.StringIO()
    t0 = time.perf_counter()
    # it prints a loss line per minibatch and a progress bar per rollout: keep them out of the report
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        trainer.train(
            num_episodes=1,
            max_timesteps=args.rollouts,
            update_timesteps=args.rollouts,
            max_seq_len=args.max_seq_len,
        )
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--dim-head", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=264, help="prompt + response tokens")
    ap.add_argument("--rollouts", type=int, default=32, help="rollouts, all learned from in one update")
    ap.add_argument("--minibatch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads for both trainers (1 is robust on a busy machine)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = _prompts(8, args.prompt_len, args.vocab, args.seed)

    # an untimed warm-up of each (first-call allocations, lazy imports), then the timed runs
    warm = argparse.Namespace(
        **{**vars(args), "rollouts": 2, "max_seq_len": args.prompt_len + 4, "minibatch_size": 2}
    )
    run_ours(warm, prompts)
    run_original(warm, prompts)
    ours = run_ours(args, prompts)
    theirs = run_original(args, prompts)
    new_tokens = args.rollouts * (args.max_seq_len - args.prompt_len)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "palm_rlhf_s": round(ours, 3),
        "palm_rlhf_pytorch_s": round(theirs, 3),
        "palm_rlhf_rollouts_per_s": round(args.rollouts / ours, 2),
        "palm_rlhf_pytorch_rollouts_per_s": round(args.rollouts / theirs, 3),
        "palm_rlhf_new_tokens_per_s": round(new_tokens / ours, 1),
        "speedup": round(theirs / ours, 1),
    }
    print(f"config: {result['config']}")
    print(f"{'trainer':<22}{'seconds':>10}{'rollouts/s':>14}")
    print(f"{'palm_rlhf':<22}{ours:>10.2f}{args.rollouts / ours:>14.2f}")
    print(f"{'palm_rlhf_pytorch':<22}{theirs:>10.2f}{args.rollouts / theirs:>14.3f}")
    print(f"speed-up (rollouts + update per second): {theirs / ours:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
