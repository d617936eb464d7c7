"""The continual online-RLHF loop: one update round of the trainer service.

Plugged into :class:`~services.trainer.core.TrainerCore` as its ``update_fn`` (the factory
:func:`make_update_fn` is what ``--update-fn services.trainer.loop:make_update_fn`` /
``PALM_RLHF_UPDATE_FN`` names). A round:

1. reads the feedback written since the last round from the log (the cursor, the last
   processed feedback id, lives in ``DATA_DIR/trainer/online-state.json``; the examples it
   produced are appended to ``DATA_DIR/trainer/online-data.jsonl`` *before* the cursor moves,
   so a crash re-reads rather than loses, and re-read rows are de-duplicated by feedback id);
2. refits the learned reward model from its current version on the training side of the
   preference pairs and ratings, checks pairwise accuracy on the held-out side, and publishes
   it (reward store + the reward service's admin ``LoadVersion``) only if that did not get worse;
3. trains the policy on logged prompts: rollouts from the trainer's own actor (the current
   policy version with a LoRA scope or trainable last layers), reference log-probs from the
   reference service and rewards from the reward service, over gRPC; then PPO, GRPO or RLOO
   from :mod:`palm_rlhf.rl.online` with a KL leash to the reference;
4. evaluates the candidate and the current policy on held-out prompts and held-out human
   pairs and publishes the merged weights only if the gate passes; the version's manifest
   records its parent and the gate's figures, and ``palm-rlhf trainer rollback`` undoes it.

Transport lives here; the learning itself is in :mod:`palm_rlhf.rl.online` and
:mod:`palm_rlhf.rl.feedback`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "online-state.json"
DATA_FILE = "online-data.jsonl"
ACTOR_SCOPE = "actor"


# --- settings -------------------------------------------------------------------------------


def parse_scorer(spec: str) -> dict[str, float]:
    """``"sentiment"``, ``"learned"``, ``"learned+sentiment"`` or weighted
    ``"learned:0.5+sentiment:2"`` -> {scorer: weight}."""
    out: dict[str, float] = {}
    for part in str(spec).replace(",", "+").split("+"):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition(":")
        name = name.strip()
        if name not in ("learned", "sentiment"):
            raise ValueError(f"unknown reward scorer {name!r} in {spec!r}; use learned, sentiment or a "
                             "combination such as 'learned:0.5+sentiment:1'")
        out[name] = float(w) if w else 1.0
    if not out:
        raise ValueError(f"empty reward scorer specification {spec!r}")
    return out


def reward_is_trained(metadata: dict[str, Any]) -> bool:
    """From a reward version's manifest metadata: fitted on feedback by the loop, or trained on
    preference pairs before it was shipped (its build recorded held-out pair accuracy, as the
    demo reward model's does). A fresh head seeded on a policy's trunk is neither."""
    if metadata.get("fitted_on_feedback") or int(metadata.get("train_pairs", 0) or 0) > 0:
        return True
    return bool((metadata.get("figures") or {}).get("heldout_pair_accuracy"))


@dataclass
class OnlineSettings:
    """Every knob of the loop. The trainer process reads them once, with the rest of its
    settings (services/common/settings.py, ``OnlineLoopSettings``: one ``PALM_RLHF_<NAME>``
    variable each, listed in docs/online.md) and :meth:`from_env` builds them from there."""

    reward_scorer: str = "learned"  # REWARD_SCORER: training reward, see parse_scorer
    # RL_ALGORITHM: ppo | grpo | drgrpo | rloo (rollouts scored by the reward; the critic-free ones are
    # cheaper on CPU), or dpo | ipo | kto (trained straight on the logged training-side pairs)
    algorithm: str = "rloo"
    actor_finetune: str = "lora"  # ACTOR_FINETUNE: lora | last_n
    lora_r: int = 8  # ACTOR_LORA_R
    last_n_layers: int = 1  # ACTOR_LAST_N
    iterations: int = 8  # RL_ITERATIONS: rollout batches per round
    prompts_per_iteration: int = 8  # RL_PROMPTS
    group_size: int = 4  # RL_GROUP_SIZE: samples per prompt (>= 2 for grpo/rloo)
    max_new_tokens: int = 48  # RL_MAX_NEW_TOKENS
    temperature: float = 1.0  # RL_TEMPERATURE: rollouts record the log-probs of the distribution sampled
    lr: float = 2e-3  # RL_LR
    epochs: int = 2  # RL_EPOCHS
    minibatch_size: int = 16  # RL_MINIBATCH
    kl_coef: float = 0.05  # KL_COEF: initial beta of the RL algorithms' KL penalty
    pref_beta: float = 0.5  # PREF_BETA: dpo / ipo / kto's beta (their implicit KL leash)
    kl_target: float = 0.0  # KL_TARGET: > 0 turns on the adaptive controller (nats per response)
    min_new_feedback: int = 1  # MIN_NEW_FEEDBACK: rows needed before a round trains
    max_train_prompts: int = 512  # MAX_TRAIN_PROMPTS: most recent logged prompts trained on
    heldout_fraction: float = 0.2  # HELDOUT_FRACTION: share of prompts (gate) and of pairs (reward) held out
    eval_prompts: int = 32  # EVAL_PROMPTS: prompts sampled by the gate (held-out ones first)
    eval_samples: int = 2  # EVAL_SAMPLES: seeded answers per gate prompt
    eval_prompts_file: str = ""  # EVAL_PROMPTS_FILE: extra held-out prompts, one per line
    eval_pairs: int = 64  # EVAL_PAIRS: most recent held-out human pairs checked by the gate
    reward_refit: bool = True  # REWARD_REFIT
    reward_refit_mode: str = "head"  # REWARD_REFIT_MODE: head (cached trunk features) | lora
    reward_steps: int = 300  # REWARD_STEPS: full-batch steps (head) or minibatch steps (lora)
    reward_lr: float = 1e-2  # REWARD_LR (lora: use about 3e-4)
    reward_min_heldout: int = 8  # REWARD_MIN_HELDOUT: held-out pairs needed to publish a refit
    reward_alpha: float = 0.05  # REWARD_ALPHA: sign-test level a refit must beat the current reward at
    gate_reward_confidence: float = 1.645  # GATE_REWARD_CONFIDENCE: paired t the candidate's gain needs
    gate_min_reward_gain: float = 0.0  # GATE_MIN_REWARD_GAIN: and at least this mean gain
    gate_rank_alpha: float = 0.05  # GATE_RANK_ALPHA: and a signed-rank test over the prompts that changed
    kl_budget: float = 12.0  # KL_BUDGET: nats per response, candidate vs the reference
    gate_max_repetition: float = 0.25  # GATE_MAX_REPETITION
    gate_min_length_ratio: float = 0.5  # GATE_MIN_LENGTH_RATIO
    gate_max_length_ratio: float = 2.0  # GATE_MAX_LENGTH_RATIO
    gate_pair_tolerance: float = 0.05  # GATE_PAIR_TOLERANCE
    gate_min_pairs: int = 16  # GATE_MIN_PAIRS: below this the human-pair check is skipped (too noisy)
    seed: int = 0  # ONLINE_SEED
    threads: int = 0  # TRAINER_THREADS: torch CPU threads during a round (0 = leave as started)

    @classmethod
    def from_settings(cls, knobs: Any, **overrides: Any) -> OnlineSettings:
        """From the trainer's ``OnlineLoopSettings`` (or a mapping of knobs), validated."""
        kw = dict(knobs.knobs() if hasattr(knobs, "knobs") else knobs)
        kw.update(overrides)
        s = cls(**{f.name: kw[f.name] for f in fields(cls) if f.name in kw})
        s.validate()
        return s

    @classmethod
    def from_env(cls, **overrides: Any) -> OnlineSettings:
        """The knobs from the environment (``PALM_RLHF_<NAME>``) over the defaults."""
        from services.common.settings import OnlineLoopSettings

        return cls.from_settings(OnlineLoopSettings.load(), **overrides)

    def validate(self) -> None:
        parse_scorer(self.reward_scorer)
        if self.algorithm not in ("ppo", "grpo", "drgrpo", "rloo", "dpo", "ipo", "kto"):
            raise ValueError("PALM_RLHF_RL_ALGORITHM must be ppo, grpo, drgrpo, rloo, dpo, ipo or kto, "
                             f"got {self.algorithm!r}")
        if self.actor_finetune not in ("lora", "last_n"):
            raise ValueError(f"PALM_RLHF_ACTOR_FINETUNE must be lora or last_n, got {self.actor_finetune!r}")
        if self.algorithm in ("grpo", "drgrpo", "rloo") and self.group_size < 2:
            raise ValueError(f"{self.algorithm} needs PALM_RLHF_RL_GROUP_SIZE >= 2")
        if self.algorithm in ("ppo", "grpo", "drgrpo", "rloo") and not self.temperature > 0:
            raise ValueError(f"{self.algorithm} needs sampled rollouts: PALM_RLHF_RL_TEMPERATURE > 0")
        if self.algorithm in ("dpo", "ipo", "kto") and not self.pref_beta > 0:
            raise ValueError(f"{self.algorithm} needs PALM_RLHF_PREF_BETA > 0 (its beta)")
        if self.reward_refit_mode not in ("head", "lora"):
            raise ValueError(f"PALM_RLHF_REWARD_REFIT_MODE must be head or lora, got {self.reward_refit_mode!r}")

    def gate_config(self):
        from palm_rlhf.rl.online import GateConfig

        return GateConfig(reward_confidence=self.gate_reward_confidence, min_reward_gain=self.gate_min_reward_gain,
                          rank_alpha=self.gate_rank_alpha,
                          kl_budget=self.kl_budget,
                          min_length_ratio=self.gate_min_length_ratio, max_length_ratio=self.gate_max_length_ratio,
                          max_repetition=self.gate_max_repetition, pair_tolerance=self.gate_pair_tolerance,
                          min_pairs=self.gate_min_pairs)


# --- state on disk -----------------------------------------------------------------------------


@dataclass
class LoopState:
    last_feedback_id: int = 0
    pending_feedback: int = 0  # rows read but not yet trained on (below MIN_NEW_FEEDBACK)
    kl_coef: float | None = None
    rounds: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class LoopStore:
    """The loop's files under ``DATA_DIR/trainer``: the cursor/state (JSON, replaced
    atomically) and the append-only training data (JSON lines)."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir) / "trainer"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / STATE_FILE
        self.data_path = self.dir / DATA_FILE

    def load_state(self) -> LoopState:
        if not self.state_path.is_file():
            return LoopState()
        raw = json.loads(self.state_path.read_text())
        known = {f.name for f in fields(LoopState)}
        return LoopState(**{k: v for k, v in raw.items() if k in known})

    def save_state(self, state: LoopState) -> None:
        tmp = self.state_path.with_name(f".{STATE_FILE}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(asdict(state), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        with open(self.data_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())

    def load_data(self) -> dict[str, list[Any]]:
        """Every stored example by type, de-duplicated (a crash between appending and moving
        the cursor makes the next round append the same rows again)."""
        from palm_rlhf.rl.feedback import example_from_dict

        out: dict[str, list[Any]] = {"pair": [], "rating": [], "thumb": [], "prompt": []}
        seen: set[str] = set()
        if not self.data_path.is_file():
            return out
        with open(self.data_path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("skipping a torn line in %s", self.data_path)
                    continue
                if d.get("type") == "prompt":
                    key = json.dumps(["prompt", d["prompt_text"]])
                else:
                    key = json.dumps([d.get("type"), d.get("feedback_id"), d.get("chosen"), d.get("rejected"),
                                      d.get("response")])
                if key in seen:
                    continue
                seen.add(key)
                x = example_from_dict(d)
                out[d["type"]].append(x)
        return out


# --- feedback source ---------------------------------------------------------------------------


class FeedbackLog:
    """Read side of the feedback log (the gateway's store: SQLite or PostgreSQL by URL)."""

    def __init__(self, database_url: str):
        self.url = database_url
        self._store = None

    def _open(self):
        if self._store is None:
            from services.common.feedback_store import open_store

            self._store = open_store(self.url)
        return self._store

    def iter_feedback(self, since_id: int) -> Iterator[Any]:
        return self._open().iter_feedback(since_id)

    def get_completion(self, completion_id: str) -> Any:
        return self._open().get_completion(completion_id)

    def count_since(self, since_id: int) -> int:
        return self._open().count_feedback_since(since_id)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


# --- service clients --------------------------------------------------------------------------


class ServiceClients:
    """Blocking gRPC clients for the reference and reward services (the update round runs in
    a worker thread, so blocking calls are what it wants)."""

    REF_CHUNK = 32
    SCORE_CHUNK = 64

    def __init__(self, reference_addr: str, reward_addr: str, admin_token: str | None = None,
                 max_message_bytes: int | None = None, timeout: float = 120.0, retry=None):
        from services.common.client import DEFAULT_RETRY, create_sync_channel
        from services.common.config import DEFAULT_MAX_MESSAGE_BYTES

        mb = max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES
        self.reference_addr, self.reward_addr = reference_addr, reward_addr
        # calls are retried by self.retry (a service restarting between two rounds' calls)
        self._ref_channel = create_sync_channel(reference_addr, max_message_bytes=mb, retries=0)
        self._reward_channel = create_sync_channel(reward_addr, max_message_bytes=mb, retries=0)
        self.admin_token = admin_token
        self.timeout = timeout
        self.retry = retry or DEFAULT_RETRY
        self._lock = threading.Lock()

    def _call(self, method, request, **kw):
        from services.common.client import call_with_retry_sync

        return call_with_retry_sync(lambda t: method(request, timeout=t, **kw), timeout=self.timeout,
                                    policy=self.retry)

    def _stubs(self):
        from palm_rlhf.proto.v1 import reference_pb2_grpc, reward_pb2_grpc

        return (reference_pb2_grpc.ReferenceStub(self._ref_channel), reward_pb2_grpc.RewardStub(self._reward_channel))

    def ref_logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[list[float]]:
        """Per-token reference log-probs of each response ([] for an empty response)."""
        from palm_rlhf.proto.v1 import reference_pb2

        ref, _ = self._stubs()
        out: list[list[float]] = [[] for _ in responses]
        todo = [i for i, r in enumerate(responses) if len(r)]
        for s in range(0, len(todo), self.REF_CHUNK):
            idx = todo[s : s + self.REF_CHUNK]
            req = reference_pb2.LogProbsRequest(sequences=[
                reference_pb2.TokenSequence(prompt_token_ids=list(prompts[i]), response_token_ids=list(responses[i]))
                for i in idx
            ])
            reply = self._call(ref.LogProbs, req)
            for i, r in zip(idx, reply.results):
                out[i] = list(r.logprobs)
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str], scorer: str | dict[str, float]) -> list[float]:
        """The weighted training reward of each response (see :func:`parse_scorer`)."""
        from palm_rlhf.proto.v1 import reward_pb2

        weights = parse_scorer(scorer) if isinstance(scorer, str) else scorer
        _, reward = self._stubs()
        names = list(weights)
        out: list[float] = []
        for s in range(0, len(responses), self.SCORE_CHUNK):
            items = [reward_pb2.ScoreItem(prompt=p, responses=[r])
                     for p, r in zip(prompts[s : s + self.SCORE_CHUNK], responses[s : s + self.SCORE_CHUNK])]
            req = reward_pb2.ScoreRequest(items=items, scorer=names[0], all_scorers=len(names) > 1)
            reply = self._call(reward.Score, req)
            for item in reply.results:
                sc = item.scores[0]
                if len(names) == 1:
                    out.append(float(sc.score) * weights[names[0]])
                else:
                    out.append(sum(w * float(sc.breakdown[n]) for n, w in weights.items()))
        return out

    def reward_load_version(self, version: str) -> str:
        from palm_rlhf.proto.v1 import common_pb2
        from services.common.client import admin_metadata

        _, reward = self._stubs()
        reply = self._call(reward.LoadVersion, common_pb2.LoadVersionRequest(version=version),
                           metadata=admin_metadata(self.admin_token))
        return reply.version

    def close(self) -> None:
        self._ref_channel.close()
        self._reward_channel.close()


# --- the loop ---------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.4f}"


class OnlineLoop:
    """One instance per trainer process; calling it runs one round (``update_fn(core)``)."""

    def __init__(self, data_dir: str | Path, database_url: str, clients: ServiceClients,
                 settings: OnlineSettings | None = None, device: str = "cpu"):
        self.data_dir = Path(data_dir)
        self.settings = settings or OnlineSettings.from_env()
        self.settings.validate()
        self.files = LoopStore(self.data_dir)
        self.feedback = FeedbackLog(database_url)
        self.clients = clients
        self.device = device
        self._features: dict[str, Any] = {}  # the head refit's feature cache, for one reward trunk

    # -- step 1: feedback ----------------------------------------------------------------

    def ingest(self, state: LoopState) -> tuple[int, int]:
        """Read feedback after the cursor, store the examples, move the cursor.
        Returns (rows read, rows skipped)."""
        from palm_rlhf.rl.feedback import convert_feedback

        rows = list(self.feedback.iter_feedback(state.last_feedback_id))
        if not rows:
            return 0, 0
        prior = self.files.load_data()["thumb"]
        batch = convert_feedback(rows, self.feedback.get_completion,
                                 prior, heldout_fraction=self.settings.heldout_fraction,
                                 since_id=state.last_feedback_id)
        if batch.feedback_count:
            self.files.append(batch.records())  # data first, cursor second
            state.last_feedback_id = batch.last_feedback_id
            state.pending_feedback += batch.feedback_count
            self.files.save_state(state)
        return batch.feedback_count, batch.skipped

    # -- step 2: reward model --------------------------------------------------------------

    def refit_reward(self, core: Any, data: dict[str, list[Any]]) -> dict[str, Any]:
        """Refit the learned reward on the training side of the logged pairs, ratings and
        thumbs (a thumb is a label of the top or bottom bin), warm-started from the last refit,
        and publish it when it beats the current reward version on the held-out pairs and
        held-out thumbs with confidence (:func:`reward_publish_decision`)."""
        import torch

        from palm_rlhf.reward import RewardModel
        from palm_rlhf.rl.online import (
            latest_thumbs,
            reward_publish_decision,
            split_pairs,
            thumb_check_pairs,
            thumbs_as_ratings,
        )
        from palm_rlhf.tokenizer import load_tokenizer

        s = self.settings
        pairs = [p for p in data["pair"] if p.chosen and p.rejected]
        train_pairs, held_pairs = split_pairs(pairs, s.heldout_fraction)
        train_ratings, _ = split_pairs(data["rating"], s.heldout_fraction)
        train_thumbs, held_thumbs = split_pairs(latest_thumbs(data["thumb"]), s.heldout_fraction)
        held_thumb_pairs = thumb_check_pairs(held_thumbs)
        current = core.reward_store.current()
        if current is None:
            return {"reward_published": 0.0, "reward_message": "the reward store is empty"}
        if not train_pairs and not train_ratings and not train_thumbs:
            return {"reward_published": 0.0, "reward_message": "no training pairs, ratings or thumbs yet"}
        served, manifest = RewardModel.from_checkpoint(core.reward_store.path(current), device=self.device)
        served = served.float().eval()
        train_ratings = train_ratings + thumbs_as_ratings(train_thumbs, served.num_binned_output)
        tok = load_tokenizer(manifest.get("tokenizer"))
        candidate = copy.deepcopy(served)
        warm = self._load_refit_state(candidate, s.reward_refit_mode)
        t0 = time.monotonic()
        if s.reward_refit_mode == "head":
            before, after, stats = self._refit_head(served, candidate, tok, train_pairs, held_pairs, train_ratings,
                                                    held_thumb_pairs)
        else:
            before, after, stats = self._refit_lora(served, candidate, tok, train_pairs, held_pairs, train_ratings,
                                                    held_thumb_pairs, seed=s.seed + len(pairs))
        self._save_refit_state(candidate, s.reward_refit_mode)
        baseline = before
        if not self._reward_trained(core):
            # the seeded head was never trained: whatever it gets right is luck, so the first
            # refit must beat chance (a coin, one half per pair), not that luck
            baseline = [0.5] * len(after)
        ok, why = reward_publish_decision(baseline, after, s.reward_min_heldout, s.reward_alpha)
        if baseline is not before:
            why += " (against chance: the current reward was never trained)"
        n_held = len(held_pairs) + len(held_thumb_pairs)
        acc_b, acc_a = (sum(before) / n_held, sum(after) / n_held) if n_held else (float("nan"), float("nan"))
        out: dict[str, Any] = {"reward_heldout_accuracy_before": acc_b, "reward_heldout_accuracy_after": acc_a,
                               "reward_heldout_pairs": float(len(held_pairs)),
                               "reward_heldout_thumb_pairs": float(len(held_thumb_pairs)),
                               "reward_train_pairs": float(len(train_pairs)),
                               "reward_train_ratings": float(len(train_ratings) - len(train_thumbs)),
                               "reward_train_thumbs": float(len(train_thumbs)), "reward_warm_start": float(warm),
                               "reward_refit_seconds": time.monotonic() - t0, **stats}
        if not ok:
            log.info("reward refit not published: %s", why)
            return {**out, "reward_published": 0.0, "reward_message": why}
        with torch.no_grad():
            version = core.reward_store.save(
                candidate, candidate.palm.config, parent=current, tokenizer=manifest.get("tokenizer"),
                metadata={"reward_head": candidate.head_config(), "heldout_accuracy": acc_a,
                          "parent_heldout_accuracy": acc_b, "heldout_pairs": len(held_pairs),
                          "heldout_thumb_pairs": len(held_thumb_pairs), "train_pairs": len(train_pairs),
                          "train_ratings": len(train_ratings) - len(train_thumbs), "train_thumbs": len(train_thumbs),
                          "fitted_on_feedback": True, "refit_mode": s.reward_refit_mode},
            )
        try:
            self.clients.reward_load_version(version)
        except Exception as e:  # noqa: BLE001 -- the store's CURRENT is already right; a restart picks it up
            log.warning("reward service did not load %s: %s", version, e)
            why += f" (the reward service did not load it yet: {type(e).__name__})"
        log.info("published reward %s: %s", version, why)
        return {**out, "reward_published": 1.0, "reward_version_published": version, "reward_message": why}

    def _refit_head(self, served, candidate, tok, train_pairs, held_pairs, train_ratings, held_thumb_pairs):
        """Head-only refit on cached trunk features: returns (before, after, stats); before and
        after score the held-out pairs, then the held-out (liked, disliked) thumb pairs."""
        import torch

        from palm_rlhf.rl.online import HeadFitConfig, fit_reward_head, head_pair_correct, reward_features

        s = self.settings
        fp = _trunk_fingerprint(served)
        if self._features.get("trunk") != fp:
            self._features = {"trunk": fp, "cache": {}}
        cache = self._features["cache"]

        def feats(prompts, responses):
            return reward_features(served, tok, prompts, responses, cache=cache)

        hc = feats([p.prompt_text for p in held_pairs] + [u.prompt_text for u, _ in held_thumb_pairs],
                   [p.chosen for p in held_pairs] + [u.response for u, _ in held_thumb_pairs])
        hr = feats([p.prompt_text for p in held_pairs] + [d.prompt_text for _, d in held_thumb_pairs],
                   [p.rejected for p in held_pairs] + [d.response for _, d in held_thumb_pairs])
        tc = feats([p.prompt_text for p in train_pairs], [p.chosen for p in train_pairs])
        tr = feats([p.prompt_text for p in train_pairs], [p.rejected for p in train_pairs])
        rf = feats([e.prompt_text for e in train_ratings], [e.response for e in train_ratings])
        labels = torch.tensor([min(e.label, max(served.num_binned_output - 1, 0)) for e in train_ratings],
                              dtype=torch.long)
        before = head_pair_correct(served, hc, hr)
        stats = fit_reward_head(candidate, tc, tr, rf if len(train_ratings) else None,
                                labels if len(train_ratings) else None,
                                HeadFitConfig(steps=s.reward_steps, lr=s.reward_lr, seed=s.seed))
        stats["reward_train_accuracy"] = (sum(head_pair_correct(candidate, tc, tr)) / len(train_pairs)
                                          if train_pairs else float("nan"))
        return before, head_pair_correct(candidate, hc, hr), stats

    def _refit_lora(self, served, candidate, tok, train_pairs, held_pairs, train_ratings, held_thumb_pairs,
                    seed: int):
        """The slower refit of the head and the reward LoRA (REWARD_REFIT_MODE=lora)."""
        from palm_rlhf.rl.online import RewardRefitConfig, refit_reward_model, reward_scores

        s = self.settings
        good = [(p.prompt_text, p.chosen) for p in held_pairs] + [(u.prompt_text, u.response) for u, _ in held_thumb_pairs]
        bad = [(p.prompt_text, p.rejected) for p in held_pairs] + [(d.prompt_text, d.response) for _, d in held_thumb_pairs]

        def correct(model):
            if not good:
                return []
            ch = reward_scores(model, tok, [p for p, _ in good], [r for _, r in good])
            rj = reward_scores(model, tok, [p for p, _ in bad], [r for _, r in bad])
            return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ch.tolist(), rj.tolist())]

        before = correct(served)
        stats = refit_reward_model(candidate, tok, train_pairs, train_ratings,
                                   RewardRefitConfig(steps=s.reward_steps, lr=s.reward_lr, seed=seed))
        return before, correct(candidate), stats

    def _refit_state_path(self, mode: str) -> Path:
        return self.files.dir / f"reward-refit-{mode}.safetensors"

    def _trainable_reward_state(self, model, mode: str) -> dict[str, Any]:
        names = {id(p) for p in (model.to_pred.parameters() if mode == "head" else model.finetune_parameters())}
        return {k: p for k, p in model.named_parameters() if id(p) in names}

    def _load_refit_state(self, model, mode: str) -> bool:
        """Continue from the last refit (published or not) when its shapes fit; True if so."""
        path = self._refit_state_path(mode)
        if not path.is_file():
            return False
        from safetensors.torch import load_file

        try:
            saved = load_file(str(path))
        except Exception as e:  # noqa: BLE001 -- a torn file only costs the warm start
            log.warning("ignoring the unreadable refit state %s: %s", path, e)
            return False
        own = self._trainable_reward_state(model, mode)
        if set(saved) != set(own) or any(saved[k].shape != own[k].shape for k in own):
            return False
        import torch

        with torch.no_grad():
            for k, p in own.items():
                p.copy_(saved[k].to(p.dtype))
        return True

    def _save_refit_state(self, model, mode: str) -> None:
        from safetensors.torch import save_file

        path = self._refit_state_path(mode)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: p.detach().float().contiguous().cpu() for k, p in self._trainable_reward_state(model, mode).items()},
                  str(tmp))
        os.replace(tmp, path)

    def _reward_trained(self, core: Any) -> bool:
        """Whether the current learned reward was trained at all: fitted on feedback, or trained
        on preference pairs before it was shipped (the demo reward model). A seeded fresh head
        on a policy's trunk is neither: it ranks at random."""
        current = core.reward_store.current()
        if current is None:
            return False
        return reward_is_trained(core.reward_store.manifest(current).get("metadata") or {})

    # -- step 3 and 4: policy -------------------------------------------------------------

    def _eval_prompt_texts(self) -> list[str]:
        path = self.settings.eval_prompts_file
        if not path:
            return []
        from palm_rlhf.chat import format_chat

        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [ln if ln.endswith("Assistant:") else format_chat([{"role": "user", "content": ln}]) for ln in lines]

    def update_policy(self, core: Any, data: dict[str, list[Any]], state: LoopState) -> tuple[str | None, dict[str, Any]]:
        import torch

        from palm_rlhf.checkpoint import load_palm
        from palm_rlhf.rl.feedback import split_heldout
        from palm_rlhf.rl.models import Actor, Critic
        from palm_rlhf.rl.online import split_pairs, usable_pairs
        from palm_rlhf.tokenizer import load_tokenizer

        s = self.settings
        current = core.policy_store.current()
        if current is None:
            return None, {"message": "the policy store is empty", "outcome": "nothing to learn"}
        if "learned" in parse_scorer(s.reward_scorer) and not self._reward_trained(core):
            return None, {"message": "waiting for a learned reward fitted on feedback (the seeded reward head "
                                     "was never trained and ranks at random; the policy does not train against it)",
                          "outcome": "waiting"}
        palm, manifest = load_palm(core.policy_store.path(current), device=self.device, dtype=torch.float32)
        tok = load_tokenizer(manifest.get("tokenizer"))
        limit = palm.config.max_seq_len - s.max_new_tokens

        def fits(p) -> bool:
            return 0 < len(p.prompt_token_ids) <= limit

        train_prompts, held_prompts = split_heldout([p for p in data["prompt"] if fits(p)])
        train_prompts = train_prompts[-s.max_train_prompts :]
        eval_texts, eval_ids = self._gate_prompts(tok, limit, held_prompts, train_prompts)
        if not train_prompts:
            return None, {"message": "no logged prompts to train on yet", "outcome": "nothing to learn"}
        if not eval_ids:
            return None, {"message": "no held-out prompts to check a candidate on yet (the gate needs them)",
                          "outcome": "nothing to learn"}
        # the human pairs the reward refit never trained on
        _, held_pairs = split_pairs([p for p in data["pair"] if p.chosen and p.rejected], s.heldout_fraction)
        held_pairs = usable_pairs([p for p in held_pairs if fits(p)])[-s.eval_pairs :]

        torch.manual_seed(s.seed + state.rounds)
        frozen_current = None
        if s.actor_finetune == "last_n":
            frozen_current = copy.deepcopy(palm).eval()
        critic = Critic(palm, lora=True, lora_r=s.lora_r) if s.algorithm == "ppo" else None
        actor = Actor(palm, finetune=s.actor_finetune, scope=ACTOR_SCOPE, lora_r=s.lora_r,
                      last_n_layers=s.last_n_layers)
        optim = torch.optim.AdamW(actor.trainable_parameters(), lr=s.lr, weight_decay=0.0)
        critic_optim = torch.optim.AdamW(critic.trainable_parameters(), lr=s.lr) if critic is not None else None
        newline = tok.encode("\n")
        stops = tuple(sorted({tok.eos_id, *newline[:1]}))
        t0 = time.monotonic()
        if s.algorithm in ("dpo", "ipo", "kto"):
            metrics = self._train_on_pairs(palm, actor, optim, tok, data, state)
            if metrics is None:
                return None, {"message": "no preference pairs to train on yet", "outcome": "nothing to learn"}
        else:
            metrics = self._train_on_rollouts(palm, actor, optim, critic, critic_optim, tok, stops, train_prompts,
                                              state)
        metrics["train_seconds"] = time.monotonic() - t0
        return self._gate_and_publish(core, current, manifest, palm, frozen_current, tok, stops,
                                      eval_texts, eval_ids, held_pairs, metrics, state)

    def _gate_prompts(self, tok, limit: int, held_prompts, train_prompts) -> tuple[list[str], list[list[int]]]:
        """The gate's prompts: the fixed file first (the same yardstick every round), then the
        most recent logged held-out prompts, then the most recent training prompts when people
        asked too few distinct questions to hold enough out (both policies still meet the same
        prompts and seeds)."""
        from palm_rlhf.chat import encode_prompt

        s = self.settings
        eval_texts: list[str] = []
        eval_ids: list[list[int]] = []
        for text in self._eval_prompt_texts():
            ids = encode_prompt(tok, text)
            if len(eval_texts) < s.eval_prompts and len(ids) <= limit:
                eval_texts.append(text)
                eval_ids.append(ids)
        for p in [*reversed(held_prompts), *reversed(train_prompts)]:
            if len(eval_texts) >= s.eval_prompts:
                break
            if p.prompt_text in eval_texts:
                continue
            eval_texts.append(p.prompt_text)
            eval_ids.append(p.prompt_token_ids)
        return eval_texts, eval_ids

    def _train_on_pairs(self, palm, actor, optim, tok, data, state: LoopState) -> dict[str, Any] | None:
        """Preference optimisation straight from the logged training-side pairs: no rollouts and
        no reward model; the reference service's log-probs anchor the implicit KL leash, and the
        candidate meets the same gate as an RL one. None when there are no pairs to train on."""
        from palm_rlhf.rl.online import (
            PreferenceUpdateConfig,
            mismatched_completions,
            preference_update,
            split_pairs,
            usable_pairs,
        )

        s = self.settings
        max_len = palm.config.max_seq_len
        train_pairs, _ = split_pairs([p for p in data["pair"] if p.chosen and p.rejected], s.heldout_fraction)
        train_pairs = usable_pairs([
            p for p in train_pairs
            if len(p.prompt_token_ids) + max(len(p.chosen_token_ids), len(p.rejected_token_ids)) <= max_len
        ])[-s.max_train_prompts :]
        if not train_pairs:
            return None

        def ref_sums(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> list[float]:
            return [sum(x) for x in self.clients.ref_logprobs(prompts, answers)]

        pair_prompts = [p.prompt_token_ids for p in train_pairs]
        ref_c = ref_sums(pair_prompts, [p.chosen_token_ids for p in train_pairs])
        ref_r = ref_sums(pair_prompts, [p.rejected_token_ids for p in train_pairs])
        extra: dict[str, Any] = {}
        if s.algorithm == "kto":  # KTO's reference point z0, from mismatched (prompt, answer) rows
            extra["ref_mismatched_logps"] = ref_sums(*mismatched_completions(train_pairs, max_len))
        pcfg = PreferenceUpdateConfig(algorithm=s.algorithm, beta=s.pref_beta, epochs=s.epochs,
                                      minibatch_size=s.minibatch_size, seed=s.seed + state.rounds)
        stats = preference_update(actor, optim, train_pairs, ref_c, ref_r, pcfg, max_len=max_len,
                                  pad_id=tok.pad_id, **extra)
        metrics: dict[str, Any] = {f"train_{k}": v for k, v in stats.items()}
        metrics["train_beta"] = s.pref_beta
        log.info("round %d %s on %d pairs: loss %.4f -> %.4f, margin %.3f, accuracy %.3f", state.rounds + 1,
                 s.algorithm, len(train_pairs), stats["loss_first"], stats["loss_last"], stats["reward_margin"],
                 stats["accuracy"])
        return metrics

    def _train_on_rollouts(self, palm, actor, optim, critic, critic_optim, tok, stops, train_prompts,
                           state: LoopState) -> dict[str, Any]:
        """RL on fresh rollouts of the logged prompts, scored by the reward service, with the
        KL to the reference service's log-probs."""
        import torch

        from palm_rlhf.generation import SamplingParams
        from palm_rlhf.rl.losses import AdaptiveKLController, FixedKLController
        from palm_rlhf.rl.online import PolicyUpdateConfig, policy_update, response_text
        from palm_rlhf.rl.rollout import rollout

        s = self.settings
        beta = state.kl_coef if state.kl_coef is not None else s.kl_coef
        kl_ctl = AdaptiveKLController(beta, s.kl_target) if s.kl_target > 0 else FixedKLController(beta)
        ucfg = PolicyUpdateConfig(algorithm=s.algorithm, epochs=s.epochs, minibatch_size=s.minibatch_size,
                                  max_new_tokens=s.max_new_tokens, temperature=s.temperature)
        params = SamplingParams(n=s.group_size,
                                max_new_tokens=s.max_new_tokens, temperature=s.temperature, stop_token_ids=stops)
        text_of = {tuple(p.prompt_token_ids): p.prompt_text for p in train_prompts}
        rng = random.Random(s.seed * 1_000_003 + state.rounds)
        agg: dict[str, list[float]] = {}
        for it in range(s.iterations):
            batch = rng.sample(train_prompts, min(s.prompts_per_iteration, len(train_prompts)))
            # a seed per prompt: one shared seed would give every prompt the same random stream
            per_prompt = [replace(params, seed=rng.randrange(2**31)) for _ in batch]
            ro = rollout(palm, [p.prompt_token_ids for p in batch], per_prompt, finetune_scope=actor.scope,
                         value_fn=(lambda seq, mask: critic(seq)) if critic is not None else None,
                         pad_id=tok.pad_id)
            refs = self.clients.ref_logprobs(ro.prompts, ro.responses)
            ro.ref_logprobs = _place(refs, ro)
            texts = [response_text(tok, r) for r in ro.responses]
            ro.scores = torch.tensor(self.clients.score([text_of[tuple(p)] for p in ro.prompts], texts,
                                                        s.reward_scorer), dtype=torch.float32)
            stats = policy_update(actor, optim, ro, ucfg, kl_ctl.value, params.n, critic=critic,
                                  critic_optim=critic_optim, seed=s.seed + it)
            kl_ctl.update(stats["rollout_kl"], len(ro))
            for k, v in stats.items():
                agg.setdefault(k, []).append(v)
            log.info("round %d iteration %d/%d: score %.3f kl %.3f beta %.4f", state.rounds + 1, it + 1,
                     s.iterations, stats["score_mean"], stats["rollout_kl"], kl_ctl.value)
        state.kl_coef = kl_ctl.value
        metrics: dict[str, Any] = {f"train_{k}": sum(v) / len(v) for k, v in agg.items()}
        metrics["train_score_first"] = agg["score_mean"][0]
        metrics["train_score_last"] = agg["score_mean"][-1]
        metrics["kl_coef"] = kl_ctl.value
        return metrics

    def _gate_and_publish(self, core, current, manifest, palm, frozen_current, tok, stops, eval_texts, eval_ids,
                          held_pairs, metrics: dict[str, Any],
                          state: LoopState) -> tuple[str | None, dict[str, Any]]:
        """Candidate and served policy answer the same prompts with the same seeds; the
        candidate is published only if the gate passes."""
        import torch

        from palm_rlhf.generation import SamplingParams
        from palm_rlhf.rl.online import evaluate_policy, gate, merged_policy_state

        s = self.settings
        eval_params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, stop_token_ids=stops)
        pair_refs = None
        if held_pairs:
            rc = self.clients.ref_logprobs([p.prompt_token_ids for p in held_pairs],
                                           [p.chosen_token_ids for p in held_pairs])
            rr = self.clients.ref_logprobs([p.prompt_token_ids for p in held_pairs],
                                           [p.rejected_token_ids for p in held_pairs])
            pair_refs = (torch.tensor([sum(x) for x in rc]), torch.tensor([sum(x) for x in rr]))

        def reward_fn(prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
            return self.clients.score(prompts, texts, s.reward_scorer)

        common = {"ref_logprobs_fn": self.clients.ref_logprobs, "reward_fn": reward_fn, "pairs": held_pairs,
                  "pair_ref_logps": pair_refs, "seed": s.seed + 7919 * (state.rounds + 1),
                  "samples_per_prompt": s.eval_samples}
        if frozen_current is not None:
            cur_eval = evaluate_policy(frozen_current, tok, eval_texts, eval_ids, eval_params, **common)
            cand_eval = evaluate_policy(palm, tok, eval_texts, eval_ids, eval_params, **common)
        else:
            cur_eval = evaluate_policy(palm, tok, eval_texts, eval_ids, eval_params, disable_lora=True, **common)
            cand_eval = evaluate_policy(palm, tok, eval_texts, eval_ids, eval_params, finetune_scope=ACTOR_SCOPE,
                                        **common)
        decision = gate(cand_eval, cur_eval, s.gate_config())
        metrics.update(cand_eval.metrics("candidate_"))
        metrics.update(cur_eval.metrics("current_"))
        metrics.update({f"gate_{k}": float(v) for k, v in decision.checks.items()})
        metrics["gate_passed"] = float(decision.passed)
        log.info("gate: candidate reward %s kl %s len %.1f rep %.3f pairs %s | current reward %s kl %s pairs %s -> %s",
                 _fmt(cand_eval.mean_reward), _fmt(cand_eval.kl), cand_eval.mean_length, cand_eval.repetition,
                 _fmt(cand_eval.pair_agreement), _fmt(cur_eval.mean_reward), _fmt(cur_eval.kl),
                 _fmt(cur_eval.pair_agreement), decision.message)
        if not decision.passed:
            return None, {**metrics, "message": decision.message, "outcome": "rejected"}
        weights = merged_policy_state(palm, ACTOR_SCOPE)
        gate_record = {
            "passed": True, "checks": decision.checks,
            "candidate": {k: v for k, v in asdict(cand_eval).items() if k != "samples"},
            "current": {k: v for k, v in asdict(cur_eval).items() if k != "samples"},
            "samples": cand_eval.samples,
        }
        version = core.publish(weights, palm.config, parent=current, tokenizer=manifest.get("tokenizer"),
                               metadata={"gate": _json_safe(gate_record), "algorithm": s.algorithm,
                                         "reward_scorer": s.reward_scorer, "round": state.rounds + 1,
                                         "feedback_cursor": state.last_feedback_id,
                                         "train": _json_safe({k: v for k, v in metrics.items()
                                                              if k.startswith("train_")})})
        return version, {**metrics, "message": f"published {version} ({decision.message})", "outcome": "published"}

    # -- the round ------------------------------------------------------------------------

    def __call__(self, core: Any) -> tuple[str | None, dict[str, Any]]:
        started = time.monotonic()
        if self.settings.threads > 0:
            import torch

            torch.set_num_threads(self.settings.threads)
        state = self.files.load_state()
        read, skipped = self.ingest(state)
        base = {"feedback_new": float(read), "feedback_skipped": float(skipped),
                "feedback_cursor": float(state.last_feedback_id)}
        if state.pending_feedback == 0:
            return None, {**base, "message": "no new feedback", "outcome": "nothing to learn"}
        if state.pending_feedback < self.settings.min_new_feedback:
            return None, {**base, "message": f"waiting for feedback: {state.pending_feedback} new rows, "
                                             f"{self.settings.min_new_feedback} needed", "outcome": "waiting"}
        data = self.files.load_data()
        metrics: dict[str, Any] = {**base, "pairs_total": float(len(data["pair"])),
                                   "ratings_total": float(len(data["rating"])),
                                   "prompts_total": float(len(data["prompt"]))}
        messages = []
        if self.settings.reward_refit:
            r = self.refit_reward(core, data)
            messages.append("reward: " + str(r.pop("reward_message", "")))
            metrics.update(r)
        version, pm = self.update_policy(core, data, state)
        messages.append("policy: " + str(pm.pop("message", "")))
        outcome = str(pm.pop("outcome", "published" if version else "nothing to learn"))
        metrics.update(pm)
        state.pending_feedback = 0
        state.rounds += 1
        metrics["round_seconds"] = time.monotonic() - started
        state.history.append({"round": state.rounds, "time": time.time(), "published": version,
                              "metrics": _json_safe({k: v for k, v in metrics.items() if not isinstance(v, str)})})
        state.history = state.history[-200:]
        self.files.save_state(state)
        metrics["message"] = "; ".join(messages)
        metrics["outcome"] = outcome
        return version, metrics

    def pending_feedback(self) -> int:
        """Feedback rows logged after the cursor (what the next round would read); the trainer
        core's automatic rounds start on this count."""
        state = self.files.load_state()
        return self.feedback.count_since(state.last_feedback_id)


def _trunk_fingerprint(model: Any) -> str:
    """A hash of every reward-model tensor outside the head: two versions with the same
    fingerprint read answers identically, so cached features stay valid between them."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith("to_pred."):
            continue
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _place(refs: list[list[float]], ro: Any):
    """Reference log-probs (one list per row) at the rollout's action positions, (B, L - 1)."""
    import torch

    out = torch.zeros_like(ro.old_logprobs)
    for i, (p, r) in enumerate(zip(ro.prompts, ro.responses)):
        if r:
            out[i, len(p) - 1 : len(p) - 1 + len(r)] = torch.tensor(refs[i], dtype=out.dtype)
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def make_update_fn(args) -> OnlineLoop:
    """The factory the trainer service calls (``--update-fn services.trainer.loop:make_update_fn``);
    ``args``: the trainer's settings (services/common/settings.py, TrainerSettings)."""
    from services.common.config import torch_device

    data_dir = Path(args.data_dir)
    database_url = getattr(args, "database_url", None) or f"sqlite:///{data_dir.resolve() / 'feedback.db'}"
    clients = ServiceClients(args.reference_addr, args.reward_addr, getattr(args, "admin_token", None),
                             getattr(args, "max_message_bytes", None))
    online = getattr(args, "online", None)
    knobs = OnlineSettings.from_settings(online) if online is not None else OnlineSettings.from_env()
    return OnlineLoop(data_dir, database_url, clients, knobs, device=torch_device(getattr(args, "device", "cpu")))
