"""Batched sampling with a static KV cache.

Prompts of different lengths share one batch: they are left-padded, every row keeps its own
rotary positions, and padded key slots are masked. Each unique prompt is prefilled once and
its cache copied to its ``n`` samples, so best-of-n costs one prefill and one batched decode.
Sampling parameters may differ per prompt (temperature, top-k, top-p, stop ids, length, seed).

Returned log-probs are those of the sampled tokens under the model's own distribution
(temperature 1, no filtering): the quantity PPO and the KL penalty need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class GenerationError(ValueError):
    """Invalid generation input (bad sampling parameters, ids out of range, too long)."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # None: torch's global generator
    n: int = 1  # samples per prompt
    logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def validate(self, num_tokens: int) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise GenerationError(f"n must be a positive integer, got {self.n!r}")
        for t in self.stop_token_ids:
            if not 0 <= int(t) < num_tokens:
                raise GenerationError(f"stop token id {t} outside the vocabulary [0, {num_tokens})")


@dataclass
class Completion:
    token_ids: list[int]  # the sampled tokens, a final stop token included
    logprobs: list[float]  # one per token
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)


@dataclass
class StepOutput:
    """One decode step of :func:`stream_generate`: ``tokens[r]`` is row r's new token, or None
    if that row had already finished. ``rows[r]`` is (prompt index, sample index)."""

    step: int
    rows: list[tuple[int, int]]
    tokens: list[int | None]
    logprobs: list[float | None]
    finished: list[str | None]  # finish reason of rows that finished at this step


class KVCache:
    """Static key/value buffers, one shared K/V head per layer (multi-query attention)."""

    def __init__(self, depth: int, batch: int, max_len: int, dim_head: int, device, dtype):
        shape = (depth, batch, 1, max_len, dim_head)  # (layer, batch, kv_head, slot, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.k[i], self.v[i]) for i in range(self.k.shape[0])]

    def select(self, rows: torch.Tensor) -> KVCache:
        out = KVCache.__new__(KVCache)
        out.k, out.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        return out


def _row_seed(seed: int, sample: int, prompt: Sequence[int]) -> int:
    """A generator seed for one row: the same request always draws the same noise, while
    different prompts (and the n samples of one prompt) sharing a seed draw different noise."""
    h = 1469598103934665603
    for t in prompt:  # FNV-1a over the prompt's ids
        h = ((h ^ int(t)) * 1099511628211) % (2**64)
    return (seed * 6364136223846793005 + sample * 1442695040888963407 + h + 1) % (2**63)


class _Sampler:
    def __init__(self, row_params: list[SamplingParams], row_samples: list[int], row_prompts: list, device):
        b = len(row_params)
        self.temps = torch.tensor([p.temperature for p in row_params], device=device, dtype=torch.float32)
        self.greedy = self.temps == 0
        self.all_greedy = bool(self.greedy.all())
        self.any_greedy = bool(self.greedy.any())
        # rows sample at logits / temperature; greedy rows keep theirs (their draw is discarded)
        self.inv_temps = None
        if not bool((self.temps == 1).all() | self.all_greedy):
            self.inv_temps = torch.where(self.greedy, 1.0, 1.0 / self.temps.clamp(min=1e-30))[:, None]
        self.topk = torch.tensor([p.top_k for p in row_params], device=device)
        self.topp = torch.tensor([p.top_p for p in row_params], device=device, dtype=torch.float32)
        self.use_topk = bool((self.topk > 0).any())
        self.use_topp = bool((self.topp < 1).any())
        self.processors = [p.logits_processor for p in row_params]
        self.use_proc = any(p is not None for p in self.processors)
        self.generators: list[torch.Generator | None] = []
        for p, j, prompt in zip(row_params, row_samples, row_prompts):
            if p.seed is None:
                self.generators.append(None)
            else:
                g = torch.Generator(device=device)
                g.manual_seed(_row_seed(int(p.seed), j, prompt))
                self.generators.append(g)
        self.any_seeded = any(g is not None for g in self.generators)
        self.batch = b

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()  # (batch, vocab)
        logp = F.log_softmax(logits, dim=-1)
        if self.all_greedy:
            greedy_tok = logits.argmax(dim=-1)
            return greedy_tok, logp.gather(-1, greedy_tok[:, None]).squeeze(-1)
        scaled = logits if self.inv_temps is None else logits * self.inv_temps
        if self.use_topk or self.use_topp:
            sorted_vals, _ = scaled.sort(dim=-1, descending=True)
            vocab = scaled.shape[-1]
            if self.use_topk:
                k = torch.where(self.topk > 0, self.topk.clamp(max=vocab), vocab)
                ranks = torch.arange(vocab, device=scaled.device)
                sorted_vals = sorted_vals.masked_fill(ranks[None] >= k[:, None], float("-inf"))
            if self.use_topp:
                probs_sorted = sorted_vals.softmax(dim=-1)
                mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
                sorted_vals = sorted_vals.masked_fill(mass_before >= self.topp[:, None], float("-inf"))
            kept = torch.isfinite(sorted_vals).sum(dim=-1).clamp(min=1)
            cutoff = sorted_vals.gather(-1, (kept - 1)[:, None])  # smallest kept logit per row
            scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
        if self.use_proc:
            rows = [proc(scaled[i : i + 1]) if proc is not None else scaled[i : i + 1] for i, proc in enumerate(self.processors)]
            scaled = torch.cat(rows, dim=0)
        probs = scaled.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; per-row generators
        # make seeded rows reproducible whatever else shares the batch.
        noise = torch.empty_like(probs).exponential_()
        if self.any_seeded:
            for i, g in enumerate(self.generators):
                if g is not None:
                    noise[i].exponential_(generator=g)
        tok = (probs / noise).argmax(dim=-1)
        if self.any_greedy:
            tok = torch.where(self.greedy, logits.argmax(dim=-1), tok)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def _normalize(model, prompts, params):
    if isinstance(params, SamplingParams) or params is None:
        params = [params or SamplingParams()] * len(prompts)
    params = list(params)
    if len(params) != len(prompts):
        raise GenerationError(f"got {len(prompts)} prompts but {len(params)} sampling parameter sets")
    if not prompts:
        raise GenerationError("no prompts given")
    vocab = model.num_tokens
    out_prompts = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        sp.validate(vocab)
        ids = [int(t) for t in p]
        if not ids:
            raise GenerationError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        limit = model.config.max_seq_len
        if len(ids) + sp.max_new_tokens > limit:
            raise GenerationError(
                f"prompt {i}: {len(ids)} prompt tokens + {sp.max_new_tokens} new tokens exceed the "
                f"model's max_seq_len of {limit}"
            )
        out_prompts.append(ids)
    return out_prompts, params


class _Run:
    """State of one batched generation: the rows, and the tokens written so far."""

    def __init__(self, rows, max_new, device):
        b = len(rows)
        self.rows = rows
        self.tokens = torch.zeros(b, max_new, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(b, max_new, dtype=torch.float32, device=device)
        self.length = torch.zeros(b, dtype=torch.long, device=device)  # tokens produced per row
        self.stopped = torch.zeros(b, dtype=torch.bool, device=device)  # finished on a stop token


@torch.inference_mode()
def _decode(model, prompts, params, finetune_scope, disable_lora, use_tqdm) -> Iterator[tuple]:
    """Core loop. Yields ``(run, step, tok, lp, was_done, hit_stop, hit_len)`` tensors per step
    without host conversions; the caller decides what to materialise."""
    prompts, params = _normalize(model, prompts, params)
    device = model.device
    cfg = model.config

    # rows: every (prompt, sample) pair
    rows = [(pi, j) for pi, sp in enumerate(params) for j in range(sp.n)]
    row_params = [params[pi] for pi, _ in rows]
    row_prompt = torch.tensor([pi for pi, _ in rows], device=device)
    b = len(rows)

    # prefill each unique prompt once, left-padded to a common length
    lens = [len(p) for p in prompts]
    plen = max(lens)
    max_new = max(sp.max_new_tokens for sp in params)
    total = plen + max_new
    u = len(prompts)
    tokens = torch.zeros(u, plen, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, plen - len(p) :] = torch.tensor(p, device=device)
    pad = torch.tensor([plen - n for n in lens], device=device)  # (prompts,)
    positions = (torch.arange(plen, device=device)[None] - pad[:, None]).clamp(min=0)  # (prompts, plen)
    slots = torch.arange(total, device=device)
    key_valid = slots[None] >= pad[:, None]  # (prompts, total)
    attn_mask = None
    if any(n != plen for n in lens):
        causal = torch.ones(plen, plen, dtype=torch.bool, device=device).tril()
        attn_mask = (key_valid[:, None, None, :plen] & causal) | torch.eye(plen, dtype=torch.bool, device=device)
    cache = KVCache(cfg.depth, u, total, cfg.dim_head, device, model.dtype)
    logits = model.forward_cached(
        tokens,
        positions,
        cache.layers(),
        0,
        attn_mask=attn_mask,
        finetune_scope=finetune_scope,
        disable_lora=disable_lora,
    )
    if b != u or not torch.equal(row_prompt, torch.arange(u, device=device)):
        cache = cache.select(row_prompt)
        logits = logits.index_select(0, row_prompt)
    caches = cache.layers()
    row_pad = pad.index_select(0, row_prompt)  # (rows,)
    row_key_valid = key_valid.index_select(0, row_prompt)[:, None, None, :]  # (rows, 1, 1, total)
    padded = bool((row_pad > 0).any())
    # rotary positions of every decode slot for every row: (rows, max_new)
    decode_positions = (plen + torch.arange(max_new, device=device))[None] - row_pad[:, None]

    sampler = _Sampler(row_params, [j for _, j in rows], [prompts[pi] for pi, _ in rows], device)
    has_stops = any(sp.stop_token_ids for sp in row_params)
    stop_width = max(1, max(len(sp.stop_token_ids) for sp in row_params))
    stop_ids = torch.full((b, stop_width), -1, dtype=torch.long, device=device)
    for r, sp in enumerate(row_params):
        if sp.stop_token_ids:
            stop_ids[r, : len(sp.stop_token_ids)] = torch.tensor(sp.stop_token_ids, device=device)
    row_max_new = torch.tensor([sp.max_new_tokens for sp in row_params], device=device)
    same_length = bool((row_max_new == max_new).all())
    done = torch.zeros(b, dtype=torch.bool, device=device)
    no_stop = torch.zeros(b, dtype=torch.bool, device=device)
    run = _Run(rows, max_new, device)
    sync_every = 8 if device.type == "cuda" else 1  # host syncs are free on the CPU, not on a GPU

    steps = range(max_new)
    if use_tqdm:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generating", unit="tok")
    pos = plen
    for step in steps:
        tok, lp = sampler(logits)
        run.tokens[:, step] = tok
        run.logprobs[:, step] = lp
        hit_stop = (tok[:, None] == stop_ids).any(dim=-1) if has_stops else no_stop
        hit_len = row_max_new <= step + 1 if not same_length or step + 1 == max_new else no_stop
        was_done = done
        if has_stops or not same_length:
            done = done | hit_stop | hit_len
            run.length += ~was_done
            run.stopped |= hit_stop & ~was_done
        else:
            run.length += 1
            done = hit_len
        yield run, step, tok, lp, was_done, hit_stop, hit_len
        if step + 1 >= max_new or ((has_stops or not same_length) and step % sync_every == 0 and bool(done.all())):
            break
        decode_mask = row_key_valid[..., : pos + 1] if padded else None
        logits = model.forward_cached(
            tok[:, None],
            decode_positions[:, step : step + 1] if padded else decode_positions[:1, step : step + 1],
            caches,
            pos,
            decode_mask=decode_mask,
            finetune_scope=finetune_scope,
            disable_lora=disable_lora,
        )
        pos += 1


def stream_generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    finetune_scope: str | None = None,
    disable_lora: bool = False,
    use_tqdm: bool = False,
) -> Iterator[StepOutput]:
    """Yield one :class:`StepOutput` per decode step until every row has finished."""
    for run, step, tok, lp, was_done, hit_stop, hit_len in _decode(
        model, prompts, params, finetune_scope, disable_lora, use_tqdm
    ):
        b = len(run.rows)
        tok_list, lp_list = tok.tolist(), lp.tolist()
        prev, hs, hl = was_done.tolist(), hit_stop.tolist(), hit_len.tolist()
        yield StepOutput(
            step=step,
            rows=run.rows,
            tokens=[None if prev[r] else tok_list[r] for r in range(b)],
            logprobs=[None if prev[r] else lp_list[r] for r in range(b)],
            finished=[
                None if prev[r] or not (hs[r] or hl[r]) else ("stop" if hs[r] else "length") for r in range(b)
            ],
        )


def generate_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    finetune_scope: str | None = None,
    disable_lora: bool = False,
    use_tqdm: bool = False,
) -> list[list[Completion]]:
    """Sample ``n`` completions for each prompt; returns them grouped per prompt."""
    run = None
    for run, *_ in _decode(model, prompts, params, finetune_scope, disable_lora, use_tqdm):
        pass
    lengths = run.length.tolist()
    stopped = run.stopped.tolist()
    toks, lps = run.tokens.tolist(), run.logprobs.tolist()
    grouped: list[list[Completion]] = [[] for _ in range(len(prompts))]
    for r, (pi, _) in enumerate(run.rows):
        n = lengths[r]
        grouped[pi].append(Completion(toks[r][:n], lps[r][:n], "stop" if stopped[r] else "length"))
    return grouped
