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
    "demo_tokenizer",
    "encode_masked",
    "encode_stream",
    "heldout_data",
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


def encode_masked(texts: Sequence[Any], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchanges (:class:`palm_rlhf.demo.corpus.Exchange`) as one id stream and a loss mask.

    ``mask[i]`` is True where token ``i`` is part of an answer (its words, or the EOS after
    the last one): the tokens an answers-only loss predicts. Each turn is encoded in pieces (``User: question\nAssistant:``, `` answer``),
    which is the same as encoding the whole text: every piece boundary is a pre-token
    boundary of the byte-level BPE and of the byte tokenizer."""
    ids: list[int] = []
    mask: list[bool] = []

    def add(piece: list[int], trained: bool) -> None:
        ids.extend(piece)
        mask.extend([trained] * len(piece))

    for ex in texts:
        add([tokenizer.bos_id], False)
        for i, turn in enumerate(ex.turns):
            add(tokenizer.encode(f"{'' if i == 0 else chr(10)}User: {turn.question}\nAssistant:"), False)
            add(tokenizer.encode(f" {turn.answer}"), True)
        add([tokenizer.eos_id], True)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


def lr_at(step: int, cfg: DemoTrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def stream_loss(
    model, stream: torch.Tensor, seq_len: int = 256, batch_size: int = 16, mask: torch.Tensor | None = None
) -> float:
    """Mean next-token cross entropy (nats per token) over consecutive windows of a stream;
    with ``mask`` (as made by :func:`encode_masked`), over the masked tokens only."""
    was_training = model.training
    model.eval()
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"stream of {len(stream)} tokens is shorter than one window of {seq_len + 1}")
    windows = torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    if mask is None:
        mask = torch.ones_like(stream, dtype=torch.bool)
    masks = torch.stack([mask[i * seq_len + 1 : i * seq_len + seq_len + 1] for i in range(n)])
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size].to(model.device)
        keep = masks[i : i + batch_size].to(model.device).reshape(-1)
        logits = model(batch[:, :-1]).float()
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        total += ce[keep].sum().item()
        count += int(keep.sum())
    model.train(was_training)
    return total / count


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "token_emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def demo_tokenizer(cfg: DemoTrainConfig, texts: Sequence[str]):
    """The tokenizer of a build: the byte tokenizer, the one of ``cfg.init_from`` when
    continuing, or a BPE trained on ``texts``."""
    from palm_rlhf.tokenizer import ByteTokenizer

    if cfg.tokenizer not in ("byte", "bpe"):
        raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {cfg.tokenizer!r}")
    if cfg.init_from:
        from palm_rlhf.checkpoint import read_manifest
        from palm_rlhf.tokenizer import load_tokenizer

        spec = read_manifest(cfg.init_from).get("tokenizer")
        if (spec or {}).get("kind", "byte") != ("byte" if cfg.tokenizer == "byte" else "hf"):
            raise ValueError(f"{cfg.init_from} does not use a {cfg.tokenizer} tokenizer; cannot continue from it")
        return load_tokenizer(spec)
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    from palm_rlhf.demo.bpe import train_bpe

    return train_bpe(texts, cfg.vocab_size)


def train_demo_model(cfg: DemoTrainConfig, progress: bool = True) -> tuple[Any, dict[str, Any], Any]:
    """Pretrain a fresh PaLM on the demo corpus; returns (model in eval mode, figures, the
    tokenizer). The figures' held-out loss is measured on :func:`heldout_data`."""
    from tqdm.auto import tqdm

    from palm_rlhf.config import PaLMConfig
    from palm_rlhf.demo.corpus import generate_exchanges
    from palm_rlhf.model import PaLM

    if cfg.loss_on not in ("all", "answers"):
        raise ValueError(f"loss_on must be 'all' or 'answers', got {cfg.loss_on!r}")
    previous_threads = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        exchanges = generate_exchanges(cfg.seed, cfg.corpus_size)
        tok = demo_tokenizer(cfg, [e.text() for e in exchanges])
        train_stream, train_mask = encode_masked(exchanges, tok)
        eval_stream, eval_mask = heldout_data(cfg, tok)
        log.info(
            "corpus: %d exchanges, %d tokens (%.1fs)",
            cfg.corpus_size,
            len(train_stream),
            time.perf_counter() - t0,
        )

        model_config = PaLMConfig.from_name(cfg.preset, num_tokens=tok.vocab_size)
        if cfg.init_from:
            from palm_rlhf.checkpoint import load_palm

            model, init_manifest = load_palm(cfg.init_from, dtype=torch.float32)
            if init_manifest["config"] != model_config.to_dict():
                raise ValueError(f"{cfg.init_from} is not a {cfg.preset!r} model; cannot continue from it")
            model.train()
            log.info("continuing from %s", cfg.init_from)
        else:
            model = PaLM(model_config).train()
        opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        gen = torch.Generator().manual_seed(cfg.seed)
        offsets_all = torch.arange(cfg.seq_len + 1)
        if cfg.loss_on == "answers":
            # windows start where an exchange starts, so every answer sees its question
            starts_all = torch.nonzero(train_stream == tok.bos_id).squeeze(1)
            starts_all = starts_all[starts_all < len(train_stream) - cfg.seq_len - 1]
        else:
            starts_all = None
            high = len(train_stream) - cfg.seq_len - 1

        losses: list[float] = []
        t0, cpu0 = time.perf_counter(), time.process_time()
        bar = tqdm(
            range(cfg.steps), desc="demo pretraining", unit="step", disable=not progress, file=sys.stderr
        )
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            if starts_all is None:
                starts = torch.randint(0, high, (cfg.batch_size,), generator=gen)
                batch = train_stream[starts[:, None] + offsets_all[None]]  # (batch, seq_len + 1)
                loss = model(batch, return_loss=True)
            else:
                pick = torch.randint(0, len(starts_all), (cfg.batch_size,), generator=gen)
                index = starts_all[pick][:, None] + offsets_all[None]
                batch, keep = train_stream[index], train_mask[index][:, 1:]  # (batch, seq_len + 1)
                logits = model(batch[:, :-1])
                ce = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
                )
                loss = (ce * keep.reshape(-1)).sum() / keep.sum().clamp(min=1)
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
            "heldout_loss_float32": round(
                stream_loss(model, eval_stream, mask=eval_mask if cfg.loss_on == "answers" else None), 4
            ),
            "corpus_tokens": len(train_stream),
            "loss_curve": [
                round(sum(losses[i : i + 25]) / len(losses[i : i + 25]), 3) for i in range(0, len(losses), 25)
            ],
        }
        return model, figures, tok
    finally:
        torch.set_num_threads(previous_threads)


def heldout_data(cfg: DemoTrainConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(stream, answer mask) of the ``cfg.eval_exchanges`` held-out exchanges that the build's
    held-out loss is measured on (over every token, or the answers only, as ``cfg.loss_on``)."""
    from palm_rlhf.demo.corpus import generate_exchanges

    return encode_masked(generate_exchanges(cfg.seed, cfg.eval_exchanges, held_out=True), tokenizer)


def _stored_state(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}



def staging_folder(out: Path) -> Path:
    """Where to write a checkpoint that will replace ``out``: ``out`` itself when it does not
    exist yet, else a hidden sibling that :func:`swap_in` moves into place once complete."""
    target = out.parent / f".{out.name}.new" if out.exists() else out
    if target != out and target.exists():
        shutil.rmtree(target)
    return target


def swap_in(target: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``target`` (no-op when they are the same folder)."""
    if target != out:
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
        os.rename(target, out)
        shutil.rmtree(old)


def check_replaceable(out: Path, force: bool) -> None:
    """Refuse to write a checkpoint over ``out`` unless ``force``, and never over a folder
    that is not a checkpoint."""
    from palm_rlhf.checkpoint import CheckpointError

    if out.exists():
        if not force:
            raise CheckpointError(f"{out} already exists; pass --force to replace it")
        if not (out / "manifest.json").is_file():
            raise CheckpointError(f"{out} exists and is not a checkpoint folder; refusing to replace it")

def build_demo_checkpoint(
    out: str | Path,
    cfg: DemoTrainConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Train the demo model and save it as a checkpoint folder at ``out``; returns ``out``."""
    from palm_rlhf.checkpoint import save_checkpoint

    cfg = cfg or DemoTrainConfig()
    out = Path(out)
    check_replaceable(out, force)
    if cfg.save_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"save_dtype must be float32, float16 or bfloat16, got {cfg.save_dtype!r}")
    save_dtype = getattr(torch, cfg.save_dtype)

    log.info(
        "pretraining the demo model (%d steps, preset %r); this takes a few minutes on CPU",
        cfg.steps,
        cfg.preset,
    )
    model, figures, tok = train_demo_model(cfg, progress=progress)
    eval_stream, eval_mask = heldout_data(cfg, tok)
    state = _stored_state(model, save_dtype)
    # the held-out loss of the weights as stored (rounded to save_dtype), computed in float32
    rounded = model.clone()
    rounded.load_state_dict({k: v.float() for k, v in state.items()})
    figures["heldout_loss_stored"] = round(
        stream_loss(rounded, eval_stream, mask=eval_mask if cfg.loss_on == "answers" else None), 4
    )
    if command is None:
        command = (
            f"palm-rlhf demo-build --out {shlex.quote(str(out))} --steps {cfg.steps} --seed {cfg.seed} "
            f"--tokenizer {cfg.tokenizer} --vocab-size {cfg.vocab_size} --loss-on {cfg.loss_on}"
        )
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
    target = staging_folder(out)
    save_checkpoint(
        target,
        state,
        model.config,
        version=out.name,
        parent=parent,
        kind="policy",
        tokenizer=tok.to_dict(),
        metadata=metadata,
    )
    swap_in(target, out)
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
