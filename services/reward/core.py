"""The reward core: scorers over text, free of gRPC.

Scorers:

* ``learned`` - a palm_rlhf RewardModel from ``CheckpointStore(DATA_DIR/checkpoints, "reward")``.
  A fresh store is seeded with the shipped demo reward model when the policy started from the
  demo model, otherwise with the policy's starting trunk and a fresh 5-bin head, and saved as
  the first version, so the service always serves (and reports) a store version.
* ``sentiment`` - the VADER compound score of the response in [-1, 1]: rule-based, needs no
  weights, and stands in for a user who likes cheerful answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from palm_rlhf.checkpoint import CheckpointError, CheckpointStore, load_palm, read_manifest
from palm_rlhf.rl.online import encode_for_reward, reward_batch  # noqa: F401 - encode_for_reward re-exported
from palm_rlhf.tokenizer import load_tokenizer
from services.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.common.metrics import ServiceMetrics
from services.common.models import LoadedPalm, model_dtype, shipped_reward_for, version_path

log = logging.getLogger(__name__)

SCORERS = ("learned", "sentiment")
CHUNK = 16  # sequences per forward pass
DEFAULT_BINS = 5  # a 1-5 rating scale


class LoadedReward(LoadedPalm):
    @property
    def config(self):
        return self.model.palm.config


def init_reward_store(st: CheckpointStore, start: Path, device: str = "cpu") -> str:
    """Create the first reward version for the policy checkpoint ``start``; returns its name.

    The shipped demo reward model when ``start`` is the demo policy it was trained on (so
    best-of-n ranks from the first request), otherwise ``start``'s trunk with a fresh head."""
    from palm_rlhf.reward import RewardModel

    shipped = shipped_reward_for(start)
    if shipped is not None:
        model, manifest = RewardModel.from_checkpoint(shipped)
        metadata = {**manifest.get("metadata", {}), "source": str(manifest.get("version") or shipped.name),
                    "seeded_from": str(shipped)}
    else:
        palm, manifest = load_palm(start, dtype=torch.float32)
        torch.manual_seed(0)  # the same trunk always gives the same initial head
        model = RewardModel(palm, num_binned_output=DEFAULT_BINS, copy_palm=False)
        metadata = {}
    version = st.next_version()
    try:
        model.save(st.root / version, version=version, tokenizer=manifest.get("tokenizer"), metadata=metadata)
    except CheckpointError:
        current = st.current()  # another process won the race
        if current is None:
            raise
        return current
    st.set_current(version)
    log.info("initialised reward store %s from %s as %s", st.root, shipped or start, version)
    return version


def load_reward(path: Path, version: str, device: str) -> LoadedReward:
    from palm_rlhf.reward import RewardModel

    model, manifest = RewardModel.from_checkpoint(path, device=device)
    dtype = model_dtype(device)
    if dtype is not None:
        model = model.to(dtype)
    return LoadedReward(model.eval(), load_tokenizer(manifest.get("tokenizer")), manifest, version, Path(path))


@dataclass
class ScoreOut:
    score: float
    bin_probs: list[float] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)


class RewardCore:
    def __init__(self, store: CheckpointStore, device: str, default_scorer: str, max_batch: int,
                 metrics: ServiceMetrics):
        if default_scorer not in SCORERS:
            raise ValueError(f"unknown scorer {default_scorer!r}; choose from {SCORERS}")
        self.store = store
        self.device = device
        self.default_scorer = default_scorer
        self.max_batch = max_batch
        self.metrics = metrics
        self.current: LoadedReward | None = None
        self._vader = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="reward")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="reward-load")
        self._load_lock = asyncio.Lock()

    async def start(self, path: Path, version: str) -> None:
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(self._loader, load_reward, path, version, self.device)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = await loop.run_in_executor(self._loader, SentimentIntensityAnalyzer)
        self._swap(loaded)

    def _swap(self, loaded: LoadedReward) -> None:
        self.current = loaded
        self.metrics.set_version(loaded.version)

    def model(self) -> LoadedReward:
        if self.current is None or self._vader is None:
            raise Unavailable("the reward model is still loading; retry shortly")
        return self.current

    async def load_version(self, version: str | None) -> tuple[str, str]:
        self.model()
        async with self._load_lock:
            previous = self.current.version
            if not version:
                version = self.store.current()
                if version is None:
                    raise Unavailable(f"the reward store {self.store.root} has no versions")
            path = version_path(self.store, version)
            if version == previous:
                return version, previous
            try:
                read_manifest(path)["metadata"]["reward_head"]
            except (KeyError, CheckpointError) as e:
                raise InvalidArgument(f"reward version {version} is not a reward model checkpoint") from e
            loaded = await asyncio.get_running_loop().run_in_executor(
                self._loader, load_reward, path, version, self.device
            )
            self._swap(loaded)
            return version, previous

    async def score(self, items: Sequence[tuple[str, Sequence[str]]], scorer: str | None = None,
                    all_scorers: bool = False, timeout: float | None = None) -> tuple[list[list[ScoreOut]], str, str]:
        """(scores per item per response, scorer used, reward version or "")."""
        scorer = scorer or self.default_scorer
        if scorer not in SCORERS:
            raise InvalidArgument(f"unknown scorer {scorer!r}; available: {', '.join(SCORERS)}")
        m = self.model()
        if not items:
            raise InvalidArgument("no items given: send at least one prompt with responses")
        pairs = []
        for i, (prompt, responses) in enumerate(items):
            if not responses:
                raise InvalidArgument(f"item {i} has no responses to score")
            pairs.extend((i, prompt, r) for r in responses)
        if len(pairs) > self.max_batch:
            raise ResourceExhausted(f"{len(pairs)} responses in one request; the limit is {self.max_batch}")
        run = list(SCORERS) if all_scorers else [scorer]
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        outs = [ScoreOut(0.0) for _ in pairs]
        for name in run:
            if name == "learned":
                scores, probs = await loop.run_in_executor(self._worker, self._learned, m, pairs, deadline)
                for o, s, p in zip(outs, scores, probs):
                    o.breakdown["learned"] = s
                    o.bin_probs = p
            else:
                scores = [self._vader.polarity_scores(r)["compound"] for _, _, r in pairs]
                for o, s in zip(outs, scores):
                    o.breakdown["sentiment"] = float(s)
            self.metrics.items_scored.labels(self.metrics.service, name).inc(len(pairs))
        for o in outs:
            o.score = o.breakdown[scorer]
        self.metrics.batch_rows.labels(self.metrics.service).observe(len(pairs))
        grouped: list[list[ScoreOut]] = [[] for _ in items]
        for (i, _, _), o in zip(pairs, outs):
            grouped[i].append(o)
        return grouped, scorer, (m.version if "learned" in run else "")

    @staticmethod
    @torch.inference_mode()
    def _learned(m: LoadedReward, pairs, deadline: float | None) -> tuple[list[float], list[list[float]]]:
        model, tok = m.model, m.tokenizer
        max_len = m.config.max_seq_len
        binned = model.binned_output
        scores: list[float] = []
        probs: list[list[float]] = []
        device = model.palm.device
        for start in range(0, len(pairs), CHUNK):
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("deadline exceeded while scoring")
            chunk = pairs[start:start + CHUNK]
            x, mask, plen = reward_batch(tok, [p for _, p, _ in chunk], [r for _, _, r in chunk], max_len, device)
            if binned:
                logits = model(x, mask=mask, prompt_lengths=plen, return_logits=True).float()  # (seqs, bins)
                p = logits.softmax(dim=-1)
                scores.extend((p @ model.bin_values.float()).tolist())
                probs.extend(p.tolist())
            else:
                scores.extend(model(x, mask=mask, prompt_lengths=plen).float().tolist())
                probs.extend([] for _ in chunk)
        return scores, probs

    async def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
