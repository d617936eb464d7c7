"""Pretraining of the demo model on the template corpus, on CPU, in a few minutes.

The recipe: the corpus of :mod:`palm_rlhf.demo.corpus` encoded as one token stream of
``[bos] exchange [eos]`` units, random windows of ``seq_len + 1`` tokens, AdamW with linear
warm-up and cosine decay, gradient clipping. The result is saved as a ``policy`` checkpoint
whose weights are stored in bfloat16 (half the bytes; the loss changes in the third
decimal) with the recipe, the losses and the exact command in the manifest's metadata.

``palm-rlhf demo-build --out DIR`` runs it; :func:`palm_rlhf.demo.demo_checkpoint_dir` runs
it too when the shipped checkpoint is missing.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from palm_rlhf.demo.recipe import DemoTrainConfig

log = logging.getLogger(__name__)

__all__ = [
    "DemoTrainConfig",
    "build_demo_checkpoint",
    "encode_stream",
    "lr_at",
    "stream_loss",
    "train_demo_model",
]


def encode_stream(texts: Sequence[str], tokenizer) -> torch.Tensor:
    """All exchanges as one 1-D id tensor, each as ``[bos] + bytes + [eos]``."""
    from palm_rlhf.demo.corpus import encode_exchange

    ids: list[int] = []
    for t in texts:
        ids.extend(encode_exchange(tokenizer, t))
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, cfg: DemoTrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def stream_loss(model, stream: torch.Tensor, seq_len: int = 256, batch_size: int = 16) -> float:
    """Mean next-token cross entropy (nats per token) over consecutive windows of a stream."""
    was_training = model.training
    model.eval()
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"stream of {len(stream)} tokens is shorter than one window of {seq_len + 1}")
    windows = torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size].to(model.device)
        logits = model(batch[:, :-1]).float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "token_emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_demo_model(cfg: DemoTrainConfig, progress: bool = True) -> tuple[Any, dict[str, Any], torch.Tensor]:
    """Pretrain a fresh PaLM on the demo corpus; returns (model in eval mode, figures, the
    held-out token stream the figures were measured on)."""
    from tqdm.auto import tqdm

    from palm_rlhf.config import PaLMConfig
    from palm_rlhf.demo.corpus import generate_exchanges
    from palm_rlhf.model import PaLM
    from palm_rlhf.tokenizer import ByteTokenizer

    previous_threads = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:
        torch.manual_seed(cfg.seed)
        tok = ByteTokenizer()
        t0 = time.perf_counter()
        train_stream = encode_stream([e.text() for e in generate_exchanges(cfg.seed, cfg.corpus_size)], tok)
        eval_stream = encode_stream(
            [e.text() for e in generate_exchanges(cfg.seed, cfg.eval_exchanges, held_out=True)], tok
        )
        log.info(
            "corpus: %d exchanges, %d tokens (%.1fs)",
            cfg.corpus_size,
            len(train_stream),
            time.perf_counter() - t0,
        )

        if cfg.init_from:
            from palm_rlhf.checkpoint import load_palm

            model, init_manifest = load_palm(cfg.init_from, dtype=torch.float32)
            if init_manifest["config"] != PaLMConfig.from_name(cfg.preset).to_dict():
                raise ValueError(f"{cfg.init_from} is not a {cfg.preset!r} model; cannot continue from it")
            model.train()
            log.info("continuing from %s", cfg.init_from)
        else:
            model = PaLM(PaLMConfig.from_name(cfg.preset)).train()
        opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        gen = torch.Generator().manual_seed(cfg.seed)
        high = len(train_stream) - cfg.seq_len - 1
        offsets_all = torch.arange(cfg.seq_len + 1)

        losses: list[float] = []
        t0, cpu0 = time.perf_counter(), time.process_time()
        bar = tqdm(
            range(cfg.steps), desc="demo pretraining", unit="step", disable=not progress, file=sys.stderr
        )
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            starts = torch.randint(0, high, (cfg.batch_size,), generator=gen)
            batch = train_stream[starts[:, None] + offsets_all[None]]  # (batch, seq_len + 1)
            loss = model(batch, return_loss=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % 10 == 0 or step == cfg.steps - 1:
                bar.set_postfix(
                    loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", lr=f"{lr_at(step, cfg):.1e}"
                )
        train_seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - cpu0  # differs from wall time when cores are shared
        model.eval()
        tail = losses[-20:]
        figures = {
            "train_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(cpu_seconds, 1),
            "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
            "tokens_per_second": round(cfg.steps * cfg.batch_size * cfg.seq_len / max(train_seconds, 1e-9)),
            "final_train_loss": round(sum(tail) / len(tail), 4),
            "heldout_loss_float32": round(stream_loss(model, eval_stream), 4),
            "corpus_tokens": len(train_stream),
            "loss_curve": [
                round(sum(losses[i : i + 25]) / len(losses[i : i + 25]), 3) for i in range(0, len(losses), 25)
            ],
        }
        return model, figures, eval_stream
    finally:
        torch.set_num_threads(previous_threads)


def _stored_state(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def build_demo_checkpoint(
    out: str | Path,
    cfg: DemoTrainConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Train the demo model and save it as a checkpoint folder at ``out``; returns ``out``."""
    from palm_rlhf.checkpoint import CheckpointError, save_checkpoint
    from palm_rlhf.tokenizer import ByteTokenizer

    cfg = cfg or DemoTrainConfig()
    out = Path(out)
    if out.exists():
        if not force:
            raise CheckpointError(f"{out} already exists; pass --force to replace it")
        if not (out / "manifest.json").is_file():
            raise CheckpointError(f"{out} exists and is not a checkpoint folder; refusing to replace it")
    if cfg.save_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"save_dtype must be float32, float16 or bfloat16, got {cfg.save_dtype!r}")
    save_dtype = getattr(torch, cfg.save_dtype)

    log.info(
        "pretraining the demo model (%d steps, preset %r); this takes a few minutes on CPU",
        cfg.steps,
        cfg.preset,
    )
    model, figures, eval_stream = train_demo_model(cfg, progress=progress)
    state = _stored_state(model, save_dtype)
    # the held-out loss of the weights as stored (rounded to save_dtype), computed in float32
    rounded = model.clone()
    rounded.load_state_dict({k: v.float() for k, v in state.items()})
    figures["heldout_loss_stored"] = round(stream_loss(rounded, eval_stream), 4)
    if command is None:
        command = f"palm-rlhf demo-build --out {shlex.quote(str(out))} --steps {cfg.steps} --seed {cfg.seed}"
    parent = None
    if cfg.init_from:
        from palm_rlhf.checkpoint import read_manifest

        init = read_manifest(cfg.init_from)
        parent = init.get("version")
        # the whole lineage, so that the chain of commands that made this model is on record
        metadata_parent = {"version": parent, "metadata": init.get("metadata", {})}
    else:
        metadata_parent = None
    metadata = {
        "description": "demo chat model pretrained on the palm_rlhf.demo.corpus template corpus",
        "recipe": asdict(cfg),
        "figures": figures,
        "build_command": command,
        "stored_dtype": cfg.save_dtype,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "chat_format": "User: <question>\\nAssistant: <answer><eos>",
        "continued_from": metadata_parent,
    }
    # Replacing: the old folder stays in place (and usable by running services) until the new
    # one is complete, then the two are swapped by renames.
    target = out.parent / f".{out.name}.new" if out.exists() else out
    if target != out and target.exists():
        shutil.rmtree(target)
    save_checkpoint(
        target,
        state,
        model.config,
        version=out.name,
        parent=parent,
        kind="policy",
        tokenizer=ByteTokenizer().to_dict(),
        metadata=metadata,
    )
    if target != out:
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
        os.rename(target, out)
        shutil.rmtree(old)
    log.info(
        "demo model saved to %s: %.0fs, final train loss %.3f, held-out loss %.3f (float32) / %.3f (%s as stored)",
        out,
        figures["train_seconds"],
        figures["final_train_loss"],
        figures["heldout_loss_float32"],
        figures["heldout_loss_stored"],
        cfg.save_dtype,
    )
    return out
