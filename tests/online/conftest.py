"""Fixtures for the online-loop tests: tiny models in checkpoint stores, a real feedback log
(the gateway's SQLite store) and in-process stand-ins for the reference and reward services."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
import torch

# Two cores shared with service processes: one thread each avoids OpenMP threads spinning
# against each other (several times slower than one thread on a busy machine).
torch.set_num_threads(1)


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    random.seed(0)
    return 0


def tiny_palm(seed: int = 0):
    from palm_rlhf.config import PaLMConfig
    from palm_rlhf.model import PaLM

    torch.manual_seed(seed)
    return PaLM(PaLMConfig.from_name("tiny"))


def make_stores(data_dir: Path) -> None:
    """Policy store with one tiny version; reward store with a 5-bin reward model on it."""
    from palm_rlhf.checkpoint import CheckpointStore
    from palm_rlhf.reward import RewardModel

    palm = tiny_palm(0)
    CheckpointStore(data_dir / "checkpoints", "policy").save(palm, palm.config, tokenizer={"kind": "byte"})
    torch.manual_seed(1)
    rm = RewardModel(palm, num_binned_output=5, dropout=0.0)
    st = CheckpointStore(data_dir / "checkpoints", "reward")
    st.save(rm, rm.palm.config, tokenizer={"kind": "byte"}, metadata={"reward_head": rm.head_config()})


class LocalClients:
    """The ServiceClients interface answered in process: reference log-probs from a frozen
    copy of the starting policy, rewards from a text function (e.g. "count the letter e")."""

    def __init__(self, reference, reward_text_fn):
        self.reference = reference
        self.reward_text_fn = reward_text_fn
        self.loaded: list[str] = []

    def ref_logprobs(self, prompts, responses):
        from palm_rlhf.rl.rollout import pack_sequences

        out = []
        for p, r in zip(prompts, responses):
            if not r:
                out.append([])
                continue
            packed = pack_sequences([p], [r])
            with torch.no_grad():
                lp = self.reference.logprobs_of(packed["sequences"])[0]
            out.append(lp[len(p) - 1 : len(p) - 1 + len(r)].tolist())
        return out

    def score(self, prompts, responses, scorer):
        return [float(self.reward_text_fn(t)) for t in responses]

    def reward_load_version(self, version):
        self.loaded.append(version)
        return version


class StoreCore:
    """What the loop needs of TrainerCore: the two stores and publish()."""

    def __init__(self, data_dir: Path):
        from palm_rlhf.checkpoint import CheckpointStore

        self.policy_store = CheckpointStore(data_dir / "checkpoints", "policy")
        self.reward_store = CheckpointStore(data_dir / "checkpoints", "reward")
        self.published: list[str] = []

    def publish(self, state, config, *, parent=None, **kw) -> str:
        v = self.policy_store.save(state, config, parent=parent, **kw)
        self.published.append(v)
        return v


def add_completion(store, prompt: str, answers: list[str], cid: str | None = None):
    """Log a completion the way the gateway does (candidates in rank order)."""
    from palm_rlhf.chat import encode_prompt, format_chat
    from palm_rlhf.tokenizer import ByteTokenizer
    from services.common.feedback_store import CandidateRecord, CompletionRecord

    tok = ByteTokenizer()
    text = format_chat([{"role": "user", "content": prompt}])
    rec = CompletionRecord(
        id=cid or f"c-{random.getrandbits(48):x}", seq=0, created_at=time.time(), model="m",
        messages=[{"role": "user", "content": prompt}], prompt_text=text,
        prompt_token_ids=encode_prompt(tok, text), sampling={}, n=len(answers), best_of=len(answers),
        policy_version="v0001", reward_version="v0001", client_id="t", latency_ms=1.0,
        candidates=[CandidateRecord(index=i, sample_index=i, text=a, raw_text=" " + a,
                                    token_ids=tok.encode(" " + a + "\n"), logprobs=[], finish_reason="stop",
                                    reward=None, shown=True, policy_version="v0001")
                    for i, a in enumerate(answers)],
    )
    return store.add_completion(rec)


@pytest.fixture
def feedback_store(tmp_path):
    from services.common.feedback_store import open_store

    st = open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
    yield st
    st.close()


def run(coro):
    return asyncio.run(coro)
