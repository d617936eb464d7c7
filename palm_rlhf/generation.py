"""Batched sampling with a static KV cache.

Prompts of different lengths share one batch: they are left-padded, every row keeps its own
rotary positions, and padded key slots are masked. Each unique prompt is prefilled once and
its cache copied to its ``n`` samples, so best-of-n costs one prefill and one batched decode.
Sampling parameters may differ per prompt (temperature, top-k, top-p, min-p, penalties, logit
bias, minimum length, stop ids, length, seed).

Logits are transformed in this order, per row: logit bias (a bias of -100 or less bans the
token), the minimum length (stop ids banned until ``min_tokens`` tokens exist), the repetition
penalty (over the prompt and the generated tokens), the presence and frequency penalties (over
the generated tokens); greedy rows take the argmax of the result; sampled rows then apply the
temperature, top-k, top-p and min-p, and draw.

Every sampled token comes with two log-probs: ``logprobs``, under the model's own distribution
(temperature 1, no bias, penalty or filtering: what a KL to a reference model compares, and
what OpenAI's API reports), and, from
:func:`generate_tokens`, ``sampled_logprobs``, under the distribution it was actually drawn
from (``logits / temperature`` restricted to the top-k / top-p set and renormalised: the
behaviour policy of an RL update, see :func:`sampling_keep_mask`; with a logit bias, penalty,
minimum length or min-p those apply too, and the RL losses, which do not model them, should
not be fed such samples). With ``top_logprobs = k``
each token also comes with the ``k`` most likely tokens and their log-probs under the model's
own distribution (the same one as ``logprobs``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from palm_rlhf import cpu_decode_runner


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
    min_p: float = 0.0  # keep tokens with probability >= min_p * the top probability (0 disables)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # seen tokens (prompt or generated): logit / p if > 0, else * p
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit; <= -100 bans it
    min_tokens: int = 0  # stop ids are banned until this many tokens were generated
    top_logprobs: int = 0  # the k most likely alternatives (model distribution) per token
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
        if not math.isfinite(self.min_p) or not 0 <= self.min_p <= 1:
            raise GenerationError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise GenerationError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for t, b in (self.logit_bias or {}).items():
            if not 0 <= int(t) < num_tokens:
                raise GenerationError(f"logit_bias token id {t} outside the vocabulary [0, {num_tokens})")
            if not math.isfinite(b):
                raise GenerationError(f"logit_bias of token {t} must be finite, got {b!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise GenerationError(
                f"min_tokens must be an integer in [0, max_new_tokens = {self.max_new_tokens}], got {self.min_tokens!r}"
            )
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= num_tokens:
            raise GenerationError(f"top_logprobs must be an integer in [0, {num_tokens}], got {self.top_logprobs!r}")

    @property
    def uses_history(self) -> bool:
        """Whether sampling needs the row's token counts (a penalty is on)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


@dataclass
class Completion:
    token_ids: list[int]  # the sampled tokens, a final stop token included
    logprobs: list[float]  # one per token, under the model's own distribution (temperature 1)
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    # one per token, under the distribution sampled (temperature, top-k, top-p, logits
    # processor applied; 0 for greedy rows); [] where not recorded
    sampled_logprobs: list[float] = field(default_factory=list)
    # with top_logprobs = k: per token, the k most likely (token id, log-prob), best first
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


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


def _row_generator(params: SamplingParams, sample: int, prompt: Sequence[int], device) -> torch.Generator | None:
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(_row_seed(int(params.seed), sample, prompt))
    return g


def sampling_keep_mask(
    scaled: torch.Tensor,
    top_k: torch.Tensor | int | None = None,
    top_p: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The tokens that top-k and then top-p (nucleus) sampling keep: a (rows, vocab) bool mask
    for temperature-scaled logits ``scaled`` (rows, vocab).

    ``top_k`` / ``top_p`` are per-row (rows,) tensors or one number for every row; a row with
    ``top_k == 0`` / ``top_p >= 1`` (or None) is not filtered by it. Top-k keeps the ``k``
    largest logits; top-p then keeps the smallest prefix of the (remaining) tokens, by
    decreasing probability, whose probability mass reaches ``p``. A token tied with the
    smallest kept logit is kept too. The sampler and the training forward of an RL update
    (:func:`palm_rlhf.rl.losses.sampling_logprobs`) share this function, so that old and new
    log-probs of the PPO ratio are taken under the same transform."""
    rows, vocab = scaled.shape
    device = scaled.device
    sorted_vals, _ = scaled.sort(dim=-1, descending=True)
    if top_k is not None:
        k = torch.as_tensor(top_k, device=device).expand(rows)
        k = torch.where(k > 0, k.clamp(max=vocab), vocab)
        ranks = torch.arange(vocab, device=device)
        sorted_vals = sorted_vals.masked_fill(ranks[None] >= k[:, None], float("-inf"))
    if top_p is not None:
        p = torch.as_tensor(top_p, dtype=torch.float32, device=device).expand(rows)[:, None]
        probs_sorted = sorted_vals.softmax(dim=-1)
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        sorted_vals = sorted_vals.masked_fill((mass_before >= p) & (p < 1), float("-inf"))
    kept = torch.isfinite(sorted_vals).sum(dim=-1).clamp(min=1)
    cutoff = sorted_vals.gather(-1, (kept - 1)[:, None])  # smallest kept logit per row
    return scaled >= cutoff


class _TokenHistory:
    """What the penalties look at, per row: counts of the generated tokens (rows, vocab) and
    the tokens of the prompt (rows, vocab) bool. Kept only while some row uses a penalty."""

    def __init__(self, counts: torch.Tensor, prompt_seen: torch.Tensor):
        self.counts, self.prompt_seen = counts, prompt_seen

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]], vocab: int, device) -> _TokenHistory:
        seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
        for r, p in enumerate(prompts):
            seen[r, torch.tensor(list(p), dtype=torch.long, device=device)] = True
        return cls(torch.zeros(len(prompts), vocab, dtype=torch.float32, device=device), seen)

    def add(self, tok: torch.Tensor) -> None:
        rows = torch.arange(tok.shape[0], device=tok.device)
        self.counts.index_put_((rows, tok), torch.ones_like(tok, dtype=self.counts.dtype), accumulate=True)

    def select(self, idx: torch.Tensor) -> _TokenHistory:
        return _TokenHistory(self.counts.index_select(0, idx), self.prompt_seen.index_select(0, idx))

    def cat(self, other: _TokenHistory) -> _TokenHistory:
        return _TokenHistory(torch.cat((self.counts, other.counts)), torch.cat((self.prompt_seen, other.prompt_seen)))


BAN_BIAS = -100.0  # a logit bias at or below this bans the token (as OpenAI documents -100)


class _Sampler:
    def __init__(self, row_params: list[SamplingParams], generators: list[torch.Generator | None], device):
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
        self.generators = list(generators)
        self.any_seeded = any(g is not None for g in self.generators)
        self.batch = b
        # min-p (on the probabilities after temperature, top-k and top-p)
        self.minp = None
        if any(p.min_p > 0 for p in row_params):
            self.minp = torch.tensor([p.min_p for p in row_params], device=device, dtype=torch.float32)[:, None]
        # logit bias: (row, token, bias) triples, a ban as -inf
        self.bias = None
        triples = [(r, int(t), float(v)) for r, p in enumerate(row_params) for t, v in (p.logit_bias or {}).items()]
        if triples:
            rr, tt, vv = zip(*triples)
            vals = torch.tensor(vv, device=device, dtype=torch.float32)
            vals = torch.where(vals <= BAN_BIAS, float("-inf"), vals)
            self.bias = (torch.tensor(rr, device=device), torch.tensor(tt, device=device), vals)
        # minimum length: the (row, stop id) pairs banned while the row is shorter than min_tokens
        self.min_tokens = None
        pairs = [(r, int(t)) for r, p in enumerate(row_params) if p.min_tokens > 0 for t in p.stop_token_ids]
        if pairs:
            rr, tt = zip(*pairs)
            self.min_tokens = torch.tensor([p.min_tokens for p in row_params], device=device)
            self.ban = (torch.tensor(rr, device=device), torch.tensor(tt, device=device))
        # penalties
        self.uses_history = any(p.uses_history for p in row_params)
        if self.uses_history:
            def col(name):
                return torch.tensor([getattr(p, name) for p in row_params], device=device, dtype=torch.float32)[:, None]

            self.presence, self.frequency, self.repetition = (
                col("presence_penalty"), col("frequency_penalty"), col("repetition_penalty")
            )
            self.use_rep = any(p.repetition_penalty != 1 for p in row_params)
        self.processed = self.bias is not None or self.min_tokens is not None or self.uses_history
        self.top_n = max((p.top_logprobs for p in row_params), default=0)
        self.last_top: tuple[torch.Tensor, torch.Tensor] | None = None  # (log-probs, ids) (batch, top_n)
        # the sampled distribution is the model's own: both log-probs coincide
        self.identity = self.inv_temps is None and not (
            self.use_topk or self.use_topp or self.use_proc or self.any_greedy or self.processed or self.minp is not None
        )

    def process(self, logits: torch.Tensor, history: _TokenHistory | None, produced) -> torch.Tensor:
        """Bias, minimum length and penalties applied to (batch, vocab) float logits; ``produced``
        is the number of tokens each row has generated ((batch,) tensor or one int)."""
        if self.bias is not None:
            logits = logits.index_put(self.bias[:2], self.bias[2], accumulate=True)
        if self.min_tokens is not None:
            short = torch.as_tensor(produced, device=logits.device) < self.min_tokens
            short = short.expand(self.batch) if short.dim() == 0 else short
            r, t = self.ban
            banned = torch.where(short[r], float("-inf"), 0.0)
            logits = logits.index_put((r, t), banned, accumulate=True)
        if self.uses_history and history is not None:
            counts = history.counts
            if self.use_rep:
                seen = (counts > 0) | history.prompt_seen
                factor = torch.where(seen, self.repetition, 1.0)
                logits = torch.where(logits > 0, logits / factor, logits * factor)
            logits = logits - self.frequency * counts - self.presence * (counts > 0)
        return logits

    def __call__(self, logits: torch.Tensor, with_sampled: bool = False, history: _TokenHistory | None = None,
                 produced=0):
        """(tokens, log-probs under the model's own distribution) for (batch, vocab) logits;
        with ``with_sampled`` also the log-probs under the distribution sampled (0 for greedy
        rows, whose distribution is a point mass). ``history`` and ``produced`` feed the
        penalties and the minimum length. With ``top_n`` alternatives asked for, they are left
        in ``last_top``."""
        logits = logits.float()  # (batch, vocab)
        logp = F.log_softmax(logits, dim=-1)
        if self.top_n:
            self.last_top = logp.topk(self.top_n, dim=-1)
        work = self.process(logits, history, produced) if self.processed else logits
        if self.all_greedy:
            greedy_tok = work.argmax(dim=-1)
            lp = logp.gather(-1, greedy_tok[:, None]).squeeze(-1)
            return (greedy_tok, lp, torch.zeros_like(lp)) if with_sampled else (greedy_tok, lp)
        scaled = work if self.inv_temps is None else work * self.inv_temps
        if self.use_topk or self.use_topp:
            keep = sampling_keep_mask(
                scaled, self.topk if self.use_topk else None, self.topp if self.use_topp else None
            )
            scaled = scaled.masked_fill(~keep, float("-inf"))
        if self.minp is not None:
            probs = scaled.softmax(dim=-1)
            scaled = scaled.masked_fill(probs < self.minp * probs.amax(dim=-1, keepdim=True), float("-inf"))
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
            tok = torch.where(self.greedy, work.argmax(dim=-1), tok)
        lp = logp.gather(-1, tok[:, None]).squeeze(-1)
        if not with_sampled:
            return tok, lp
        if self.identity:
            return tok, lp, lp
        sampled = F.log_softmax(scaled, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
        if self.any_greedy:
            sampled = torch.where(self.greedy, torch.zeros_like(sampled), sampled)
        return tok, lp, sampled


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

    def __init__(self, rows, max_new, device, top_n: int = 0):
        b = len(rows)
        self.rows = rows
        # with top_n alternatives asked for: their ids and log-probs per step, (b, max_new, top_n)
        self.top_ids = torch.zeros(b, max_new, top_n, dtype=torch.long, device=device) if top_n else None
        self.top_logprobs = torch.zeros(b, max_new, top_n, dtype=torch.float32, device=device) if top_n else None
        self.tokens = torch.zeros(b, max_new, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(b, max_new, dtype=torch.float32, device=device)
        self.sampled_logprobs = torch.zeros(b, max_new, dtype=torch.float32, device=device)
        self.length = torch.zeros(b, dtype=torch.long, device=device)  # tokens produced per row
        self.stopped = torch.zeros(b, dtype=torch.bool, device=device)  # finished on a stop token
        self.row_top = [0] * b  # alternatives asked for, per row


def _decode_step(model, tok, positions, caches, pos, decode_mask, row_start, finetune_scope, disable_lora):
    """One decode step: ``tok`` (rows,) new tokens at ``positions`` ((rows, 1) or (1, 1))
    written at slot ``pos``; ``decode_mask`` and ``row_start`` (rows,) describe left padding
    (None: none). The CPU decode runner takes it where it applies, the model's general path
    (:meth:`PaLM.forward_cached`, i.e. :meth:`ParallelBlock.forward`) everywhere else.
    Returns the next-token logits (rows, vocab)."""
    tokens = tok[:, None]
    runner = cpu_decode_runner.runner_for(
        model, tokens, caches, pos, decode_mask, row_start, finetune_scope=finetune_scope, disable_lora=disable_lora
    )
    if runner is not None:
        return runner.step(tok, positions, caches, pos, row_start if decode_mask is not None else None)
    return model.forward_cached(
        tokens,
        positions,
        caches,
        pos,
        decode_mask=decode_mask,
        finetune_scope=finetune_scope,
        disable_lora=disable_lora,
        row_start=row_start,
    )


def _prefill(model, prompts: list[list[int]], row_prompt: torch.Tensor, total: int, finetune_scope, disable_lora):
    """Prefill each unique prompt once, left-padded to the longest, into a cache of ``total``
    slots; then give every row (``row_prompt[r]``: its prompt) its prompt's cache and logits.
    Returns (cache, logits (rows, vocab), pad (prompts,): each prompt's left padding)."""
    device, cfg = model.device, model.config
    lens = [len(p) for p in prompts]
    plen, u = max(lens), len(prompts)
    tokens = torch.zeros(u, plen, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, plen - len(p) :] = torch.tensor(p, device=device)
    pad = torch.tensor([plen - n for n in lens], device=device)  # (prompts,)
    positions = (torch.arange(plen, device=device)[None] - pad[:, None]).clamp(min=0)  # (prompts, plen)
    attn_mask = None
    if any(n != plen for n in lens):
        key_valid = torch.arange(plen, device=device)[None] >= pad[:, None]  # (prompts, plen)
        causal = torch.ones(plen, plen, dtype=torch.bool, device=device).tril()
        attn_mask = (key_valid[:, None, None, :] & causal) | torch.eye(plen, dtype=torch.bool, device=device)
    cache = KVCache(cfg.depth, u, total, cfg.dim_head, device, model.dtype)
    logits = model.forward_cached(
        tokens,
        positions,
        cache.layers(),
        0,
        attn_mask=attn_mask,
        finetune_scope=finetune_scope,
        disable_lora=disable_lora,
        row_start=pad if attn_mask is not None else None,  # the kernels' form of the left padding
    )
    if len(row_prompt) != u or not torch.equal(row_prompt, torch.arange(u, device=device)):
        cache = cache.select(row_prompt)
        logits = logits.index_select(0, row_prompt)
    return cache, logits, pad


@torch.inference_mode()
def _decode(model, prompts, params, finetune_scope, disable_lora, use_tqdm) -> Iterator[tuple]:
    """Core loop. Yields ``(run, step, tok, lp, was_done, hit_stop, hit_len)`` tensors per step
    without host conversions; the caller decides what to materialise."""
    prompts, params = _normalize(model, prompts, params)
    device = model.device

    # rows: every (prompt, sample) pair
    rows = [(pi, j) for pi, sp in enumerate(params) for j in range(sp.n)]
    row_params = [params[pi] for pi, _ in rows]
    row_prompt = torch.tensor([pi for pi, _ in rows], device=device)
    b = len(rows)

    plen = max(len(p) for p in prompts)
    max_new = max(sp.max_new_tokens for sp in params)
    total = plen + max_new
    cache, logits, pad = _prefill(model, prompts, row_prompt, total, finetune_scope, disable_lora)
    caches = cache.layers()
    row_pad = pad.index_select(0, row_prompt)  # (rows,)
    slots = torch.arange(total, device=device)
    row_key_valid = (slots[None] >= row_pad[:, None])[:, None, None, :]  # (rows, 1, 1, total)
    padded = bool((row_pad > 0).any())
    # rotary positions of every decode slot for every row: (rows, max_new)
    decode_positions = (plen + torch.arange(max_new, device=device))[None] - row_pad[:, None]

    sampler = _Sampler(row_params, [_row_generator(params[pi], j, prompts[pi], device) for pi, j in rows], device)
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
    run = _Run(rows, max_new, device, sampler.top_n)
    run.row_top = [sp.top_logprobs for sp in row_params]
    history = _TokenHistory.of([prompts[pi] for pi, _ in rows], model.num_tokens, device) if sampler.uses_history else None
    sync_every = 8 if device.type == "cuda" else 1  # host syncs are free on the CPU, not on a GPU

    steps = range(max_new)
    if use_tqdm:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generating", unit="tok")
    pos = plen
    for step in steps:
        tok, lp, sampled_lp = sampler(logits, with_sampled=True, history=history, produced=step)
        if history is not None:
            history.add(tok)
        if sampler.top_n:
            run.top_logprobs[:, step], run.top_ids[:, step] = sampler.last_top
        run.tokens[:, step] = tok
        run.logprobs[:, step] = lp
        run.sampled_logprobs[:, step] = sampled_lp
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
        logits = _decode_step(
            model,
            tok,
            decode_positions[:, step : step + 1] if padded else decode_positions[:1, step : step + 1],
            caches,
            pos,
            row_key_valid[..., : pos + 1] if padded else None,
            row_pad if padded else None,
            finetune_scope,
            disable_lora,
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
    toks, lps, slps = run.tokens.tolist(), run.logprobs.tolist(), run.sampled_logprobs.tolist()
    row_top = run.row_top
    if run.top_ids is not None:
        top_ids, top_lps = run.top_ids.tolist(), run.top_logprobs.tolist()
    grouped: list[list[Completion]] = [[] for _ in range(len(prompts))]
    for r, (pi, _) in enumerate(run.rows):
        n = lengths[r]
        k = row_top[r]
        top = [list(zip(top_ids[r][j][:k], top_lps[r][j][:k])) for j in range(n)] if k else []
        grouped[pi].append(
            Completion(toks[r][:n], lps[r][:n], "stop" if stopped[r] else "length", slps[r][:n], top)
        )
    return grouped


# --- continuous batching --------------------------------------------------------------------


@dataclass(eq=False)
class SessionRow:
    """One (prompt, sample) row of a :class:`DecodeSession`. ``tag`` is the caller's."""

    tag: object
    prompt_index: int  # within its :meth:`DecodeSession.add` call
    sample_index: int
    params: SamplingParams = field(repr=False)
    generator: torch.Generator | None = field(repr=False)
    produced: int = 0  # tokens sampled so far
    finish_reason: str | None = None  # "stop", "length" or "removed" once it has left


@dataclass
class RowEvent:
    """Row ``row`` sampled ``token`` (log-prob ``logprob``); ``finished`` is the finish reason
    if that token ended it ("stop": a stop id, included in ``token``; "length"). ``top`` holds
    the row's ``top_logprobs`` most likely (token id, log-prob) at this step, best first."""

    row: SessionRow
    token: int
    logprob: float
    finished: str | None
    top: list[tuple[int, float]] = field(default_factory=list)


class DecodeSession:
    """Iteration-level ("continuous") batching over one KV cache: new prompts join the batch
    between decode steps and finished rows leave it at once, so a server never holds a new
    request back until the whole running batch is done.

    All rows share one slot clock ``pos``: a joining prompt is left-padded so that its last
    token sits just before ``pos`` (the slots before it are masked for that row, and its rotary
    positions start at 0 as if it ran alone), so one decode step still writes every row's new
    key and value at the same slot. Leading slots that no row uses any more are dropped when
    rows join; the cache never exceeds ``max_slots`` slots (default: twice the model's
    ``max_seq_len``), and :meth:`fits` tells whether a prompt can join now.

    Rows draw their noise from their own seeded generators exactly as in :func:`generate_tokens`,
    so a seeded row samples what it would sample alone, whoever shares the batch.

        session = DecodeSession(model)
        session.add([prompt_ids], SamplingParams(n=4, max_new_tokens=32), tag="a")
        while session:
            for ev in session.step():  # one token for every row
                ...
            session.add(...)  # newcomers join here
    """

    def __init__(self, model, *, finetune_scope: str | None = None, disable_lora: bool = False,
                 max_slots: int | None = None):
        self.model = model
        self.device = model.device
        self.finetune_scope, self.disable_lora = finetune_scope, disable_lora
        self.max_slots = max_slots or 2 * model.config.max_seq_len
        self.rows: list[SessionRow] = []
        self.pos = 0  # the slot the next decode step writes
        # (depth, row capacity, 1, slot capacity, dim_head); rows [0, len(rows)) are live
        self._k = self._v = None
        self._pad = torch.zeros(0, dtype=torch.long, device=self.device)  # each row's first slot
        self._logits: torch.Tensor | None = None  # (rows, vocab): the next token's logits
        self._history: _TokenHistory | None = None  # while some row uses a penalty
        self._membership_changed()

    def __len__(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:
        return bool(self.rows)

    @property
    def slots(self) -> int:
        """Slots the KV cache holds now (its capacity, not what the rows use)."""
        return 0 if self._k is None else self._k.shape[3]

    # -- joining --------------------------------------------------------------------------

    def _remaining(self) -> int:
        return max((r.params.max_new_tokens - r.produced for r in self.rows), default=0)

    def _lead(self) -> int:
        return int(self._pad.min()) if self.rows else 0

    def fits(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> bool:
        """Whether these prompts can join now without the cache outgrowing ``max_slots``."""
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        plen = max(len(p) for p in prompts)
        new_pos = max(self.pos - self._lead(), plen) if self.rows else plen
        remaining = max(self._remaining(), max(sp.max_new_tokens for sp in params))
        return new_pos + remaining <= self.max_slots

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
            tag: object = None) -> list[SessionRow]:
        """Prefill ``prompts`` and add their ``n`` samples each as new rows (tagged ``tag``);
        they sample their first token at the next :meth:`step`. Raises
        :class:`GenerationError` for invalid input or when they do not fit (see :meth:`fits`)."""
        prompts, params = _normalize(self.model, prompts, params)
        if not self.fits(prompts, params):
            raise GenerationError(
                f"the running batch has no room for these prompts now ({self.max_slots} cache slots)"
            )
        specs = [(pi, j) for pi, sp in enumerate(params) for j in range(sp.n)]
        row_prompt = torch.tensor([pi for pi, _ in specs], device=self.device)
        plen = max(len(p) for p in prompts)
        cache, logits, pad = _prefill(self.model, prompts, row_prompt, plen, self.finetune_scope, self.disable_lora)
        new_rows = [
            SessionRow(tag, pi, j, params[pi], _row_generator(params[pi], j, prompts[pi], self.device))
            for pi, j in specs
        ]
        old, b = len(self.rows), len(new_rows)
        remaining = max(self._remaining(), max(sp.max_new_tokens for sp in params))
        if (
            old
            and plen <= self.pos
            and self.pos + remaining <= self.slots
            and old + b <= self._k.shape[1]
        ):
            # the common case under load: the new rows slot in where they are, nothing moves
            new_pos, offset = self.pos, 0
            k, v = self._k, self._v
        else:
            # re-lay the cache: drop leading slots no row uses, make room on the left for a
            # prompt longer than the clock, and leave headroom so later joins slot in
            lead = self._lead()
            pos = self.pos - lead
            new_pos = max(pos, plen) if old else plen
            shift = new_pos - pos  # existing rows move right by this many slots
            need = new_pos + remaining
            slots = min(self.max_slots, 2 * need)
            rows_cap = max(4, 1 << (old + b - 1).bit_length())
            depth, _, _, _, d = cache.k.shape
            k = torch.zeros(depth, rows_cap, 1, slots, d, device=self.device, dtype=cache.k.dtype)
            v = torch.zeros_like(k)
            if old:
                k[:, :old, :, shift : shift + pos] = self._k[:, :old, :, lead : self.pos]
                v[:, :old, :, shift : shift + pos] = self._v[:, :old, :, lead : self.pos]
            offset = shift - lead  # every existing row's slots move by this much
        k[:, old : old + b, :, new_pos - plen : new_pos] = cache.k
        v[:, old : old + b, :, new_pos - plen : new_pos] = cache.v
        self._k, self._v, self.pos = k, v, new_pos
        self._pad = torch.cat((self._pad + offset, new_pos - plen + pad.index_select(0, row_prompt)))
        self._logits = logits if not old else torch.cat((self._logits, logits))
        if self._history is not None or any(sp.uses_history for sp in params):
            joining = _TokenHistory.of([prompts[pi] for pi, _ in specs], self.model.num_tokens, self.device)
            if self._history is None and old:
                self._history = _TokenHistory.of([[] for _ in range(old)], self.model.num_tokens, self.device)
            self._history = joining if self._history is None else self._history.cat(joining)
        self.rows.extend(new_rows)
        self._membership_changed()
        return new_rows

    # -- leaving ----------------------------------------------------------------------------

    @torch.inference_mode()
    def remove(self, rows: Sequence[SessionRow]) -> None:
        """Drop rows (a cancelled request's) from the batch before they finish."""
        gone = {id(r) for r in rows}
        for r in self.rows:
            if id(r) in gone:
                r.finish_reason = "removed"
        self._keep([i for i, r in enumerate(self.rows) if id(r) not in gone])

    def _keep(self, keep: list[int]) -> torch.Tensor | None:
        """Keep the rows at indices ``keep``: live rows from the end move into the holes (only
        their cache rows are copied). Returns the new order as old indices (None: unchanged)."""
        n = len(keep)
        if n == len(self.rows):
            return None
        if not n:
            self.rows, self._k, self._v, self._logits, self.pos = [], None, None, None, 0
            self._history = None
            self._pad = self._pad[:0]
            self._membership_changed()
            return torch.zeros(0, dtype=torch.long, device=self.device)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        if holes:
            for h, m in zip(holes, movers):
                order[h] = m
            h, m = torch.tensor(holes, device=self.device), torch.tensor(movers, device=self.device)
            self._k[:, h] = self._k[:, m]
            self._v[:, h] = self._v[:, m]
        idx = torch.tensor(order, device=self.device)
        self.rows = [self.rows[i] for i in order]
        self._pad = self._pad.index_select(0, idx)
        if self._logits is not None:
            self._logits = self._logits.index_select(0, idx)
        if self._history is not None:
            self._history = self._history.select(idx)
        self._membership_changed()
        return idx

    def _membership_changed(self) -> None:
        r = len(self.rows)
        self._sampler = _Sampler([row.params for row in self.rows], [row.generator for row in self.rows], self.device)
        self._stops = [frozenset(int(t) for t in row.params.stop_token_ids) for row in self.rows]
        if not self._sampler.uses_history:
            self._history = None
        self._min_tokens = self._sampler.min_tokens is not None
        self._caches = [] if self._k is None else [(self._k[i, :r], self._v[i, :r]) for i in range(self._k.shape[0])]
        self._padded = bool((self._pad > 0).any()) if self.rows else False
        if self._padded:
            slots = torch.arange(self.slots, device=self.device)
            self._key_valid = (slots[None] >= self._pad[:, None])[:, None, None, :]  # (rows, 1, 1, slots)

    # -- decoding ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RowEvent]:
        """Sample one token for every row, retire the rows that finished, and run the decode
        step that gives the others their next logits. Returns one event per row."""
        if not self.rows:
            return []
        produced = 0
        if self._min_tokens:
            produced = torch.tensor([r.produced for r in self.rows], device=self.device)
        tok, lp = self._sampler(self._logits, history=self._history, produced=produced)
        if self._history is not None:
            self._history.add(tok)
        toks, lps = tok.tolist(), lp.tolist()
        top_lps = top_ids = None
        if self._sampler.top_n:
            top_lps, top_ids = (t.tolist() for t in self._sampler.last_top)
        events, keep = [], []
        for i, row in enumerate(self.rows):
            row.produced += 1
            t = toks[i]
            if t in self._stops[i]:
                row.finish_reason = "stop"
            elif row.produced >= row.params.max_new_tokens:
                row.finish_reason = "length"
            else:
                keep.append(i)
            k = row.params.top_logprobs
            top = list(zip(top_ids[i][:k], top_lps[i][:k])) if k else []
            events.append(RowEvent(row, t, lps[i], row.finish_reason, top))
        order = self._keep(keep)
        if order is not None:
            tok = tok.index_select(0, order)
        if self.rows:
            positions = (self.pos - self._pad)[:, None]
            self._logits = _decode_step(
                self.model,
                tok,
                positions if self._padded else positions[:1],
                self._caches,
                self.pos,
                self._key_valid[..., : self.pos + 1] if self._padded else None,
                self._pad if self._padded else None,
                self.finetune_scope,
                self.disable_lora,
            )
            self.pos += 1
        return events
