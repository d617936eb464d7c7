"""Simulated people with a taste the system is never told, driving a running system through
its HTTP API only, and the measurement of what they get.

A :class:`Rater` asks demo questions through ``/v1/chat/completions`` with several candidates,
as the web page shows them, and clicks: thumbs up on answers it likes, down on the others, and
"this one is better" between a liked and a disliked one. Its taste is a rule on the answer's
text (:data:`TASTES`), never sentiment, and nothing of it reaches the services but the clicks.

:func:`measure` asks the gateway a fixed set of questions the raters never asked, with fixed
seeds, and reports the share of served answers the raters would like: the figure that must
rise if the system learns what its users prefer.

``palm-rlhf demo-users --url http://127.0.0.1:8000`` runs raters against a running system (for
example ``palm-rlhf up`` on its defaults) and prints that figure for every policy version the
gateway serves; ``tests/online/test_learning_e2e.py`` asserts on it.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Each taste: does the rater like this answer? None of them is about sentiment, and the trainer
# is told none of them.
TASTES: dict[str, Callable[[str], bool]] = {
    # likes answers that say when: a day of the week or a time of day
    "when": re.compile(
        r"\b(monday|tuesday|wednesday|thursday|friday|saturday|sunday|weekend|morning|evening|"
        r"afternoon|tonight|tomorrow|today)s?\b", re.IGNORECASE).search,
    # likes calm answers: no exclamation mark
    "calm": lambda text: "!" not in text,
}


def likes(taste: str, text: str) -> bool:
    try:
        rule = TASTES[taste]
    except KeyError:
        raise ValueError(f"unknown taste {taste!r}; choose from {sorted(TASTES)}") from None
    return bool(rule(text))


def split_prompts(seed: int = 0, measure: int = 48) -> tuple[list[str], list[str]]:
    """(questions the raters ask, questions only the measurement asks): disjoint, both from
    the demo corpus' held-out questions."""
    from palm_rlhf.demo.corpus import held_out_prompts

    pool = held_out_prompts(seed=seed, count=300)
    return pool[: len(pool) - measure], pool[len(pool) - measure :]


def _post(http: Any, path: str, body: dict[str, Any], attempts: int = 20) -> Any:
    """POST as a polite client: a 429 (the gateway's per-client rate limit, which several
    raters from one address share) is waited out for its Retry-After and sent again."""
    for _ in range(attempts - 1):
        r = http.post(path, json=body)
        if r.status_code != 429:
            break
        time.sleep(float(r.headers.get("Retry-After", "1")))
    else:
        r = http.post(path, json=body)
    r.raise_for_status()
    return r


@dataclass
class Rater:
    """One simulated person: asks ``best_of`` candidates and clicks on all of them."""

    taste: str
    prompts: Sequence[str]
    rng: random.Random
    best_of: int = 4
    max_tokens: int = 48
    user: str = "rater"

    def chat(self, http: Any) -> dict[str, int]:
        question = self.rng.choice(list(self.prompts))
        r = _post(http, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": question}], "n": self.best_of, "best_of": self.best_of,
            "max_tokens": self.max_tokens, "seed": self.rng.randrange(2**31), "user": self.user,
        })
        body = r.json()
        verdicts = [(c["index"], likes(self.taste, c["message"]["content"])) for c in body["choices"]]
        sent = {"chats": 1, "thumbs": 0, "preferences": 0, "liked": sum(v for _, v in verdicts)}
        for index, liked in verdicts:
            _post(http, "/v1/feedback", {"completion_id": body["id"], "choice_index": index,
                                         "thumbs": "up" if liked else "down"})
            sent["thumbs"] += 1
        good = [i for i, v in verdicts if v]
        bad = [i for i, v in verdicts if not v]
        if good and bad:
            _post(http, "/v1/feedback", {"completion_id": body["id"], "preferred_index": self.rng.choice(good),
                                         "rejected_index": self.rng.choice(bad)})
            sent["preferences"] += 1
        return sent


@dataclass
class Measurement:
    policy_version: str
    reward_version: str
    score: float  # share of served answers the raters like
    answers: int
    samples: list[str] = field(default_factory=list)
    at: float = field(default_factory=time.time)


def measure(http: Any, taste: str, prompts: Sequence[str], *, best_of: int = 4, samples: int = 2,
            max_tokens: int = 48, seed: int = 1234) -> Measurement:
    """Ask every measuring question ``samples`` times with fixed seeds (the same for every
    version) and score the answers served (best of ``best_of``) by the raters' taste."""
    liked, texts, versions, rewards = 0, [], set(), set()
    for i, q in enumerate(prompts):
        for j in range(samples):
            r = _post(http, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": q}], "n": 1, "best_of": best_of,
                "max_tokens": max_tokens, "seed": seed + 1000 * i + j, "user": "measure",
            })
            body = r.json()
            text = body["choices"][0]["message"]["content"]
            versions.add(body.get("policy_version", ""))
            rewards.add(body.get("reward_version", ""))
            liked += likes(taste, text)
            texts.append(text)
    return Measurement(policy_version="+".join(sorted(versions)), reward_version="+".join(sorted(rewards)),
                       score=liked / max(len(texts), 1), answers=len(texts), samples=texts[:3])


def served_versions(http: Any) -> tuple[str, str]:
    """(policy, reward) versions the gateway serves now, from a one-token completion."""
    r = _post(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                             "max_tokens": 1, "user": "measure"})
    body = r.json()
    return body.get("policy_version", ""), body.get("reward_version", "")


@dataclass
class SessionResult:
    measurements: list[Measurement]
    feedback: dict[str, int]
    first_new_version_after: float | None  # seconds from the first chat to a new policy version

    def to_dict(self) -> dict[str, Any]:
        return {"measurements": [asdict(m) for m in self.measurements], "feedback": self.feedback,
                "first_new_version_after": self.first_new_version_after}


def run_raters(url: str, *, taste: str = "when", minutes: float = 25.0, raters: int = 4, best_of: int = 4,
               measure_prompts: int = 48, measure_samples: int = 2, measure_best_of: int = 4,
               max_tokens: int = 48, seed: int = 0, stop_when: Callable[[list[Measurement]], bool] | None = None,
               say: Callable[[str], None] = print, timeout: float = 300.0,
               api_key: str | None = None) -> SessionResult:
    """Raters chat and click for ``minutes``; whenever the gateway serves a new policy or reward
    version (the reward ranks the best-of-n candidates) the measurement runs on it. Returns every
    measurement (the first is of the starting versions). ``api_key``: when the gateway wants one."""
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the figures
    ask, held = split_prompts(seed, measure_prompts)
    rng = random.Random(seed)
    people = [Rater(taste, ask, random.Random(rng.randrange(2**31)), best_of, max_tokens, f"rater-{i}")
              for i in range(raters)]
    counts = {"chats": 0, "thumbs": 0, "preferences": 0, "liked": 0}
    lock = threading.Lock()
    stop = threading.Event()
    chatting = threading.Event()  # cleared while a measurement runs, so that it measures alone
    chatting.set()
    errors: list[BaseException] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def chat_loop(person: Rater) -> None:
        with httpx.Client(base_url=url, timeout=timeout, headers=headers) as http:
            while not stop.is_set():
                if not chatting.wait(0.5):
                    continue
                try:
                    sent = person.chat(http)
                except Exception as e:  # noqa: BLE001 -- reported by the main thread
                    errors.append(e)
                    stop.set()
                    return
                with lock:
                    for k, v in sent.items():
                        counts[k] += v

    with httpx.Client(base_url=url, timeout=timeout, headers=headers) as http:
        def take() -> Measurement:
            chatting.clear()
            try:
                m = measure(http, taste, held, best_of=measure_best_of, samples=measure_samples,
                            max_tokens=max_tokens, seed=seed * 7 + 1234)
            finally:
                chatting.set()
            say(f"policy {m.policy_version} (reward {m.reward_version}): raters like {m.score:.0%} of "
                f"{m.answers} served answers; e.g. {m.samples[0]!r}")
            return m

        measurements = [take()]
        started = time.monotonic()
        threads = [threading.Thread(target=chat_loop, args=(p,), daemon=True) for p in people]
        for t in threads:
            t.start()
        first_new: float | None = None
        last_report = started
        try:
            while time.monotonic() - started < minutes * 60 and not stop.is_set():
                time.sleep(2.0)
                policy, reward = served_versions(http)
                last = measurements[-1]
                if (policy, reward) != (last.policy_version, last.reward_version):
                    if first_new is None and policy != measurements[0].policy_version:
                        first_new = time.monotonic() - started
                    with lock:
                        say(f"[{time.monotonic() - started:5.0f}s] now serving policy {policy}, reward {reward}; "
                            f"feedback so far {counts}")
                    measurements.append(take())
                    if stop_when is not None and stop_when(measurements):
                        break
                elif time.monotonic() - last_report > 60:
                    last_report = time.monotonic()
                    with lock:
                        say(f"[{time.monotonic() - started:5.0f}s] serving {policy}; feedback so far {counts}")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=timeout)
    if errors:
        raise RuntimeError(f"a rater failed: {errors[0]!r}") from errors[0]
    return SessionResult(measurements, dict(counts), first_new)


def save_result(result: SessionResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=1))


def kl_per_version(data_dir: str | Path, prompts: Sequence[str], samples: int = 2, max_tokens: int = 48,
                   seed: int = 1234) -> dict[str, float]:
    """KL of every stored policy version to the first one (the reference every service leashes
    to), in nats per answer: seeded answers to ``prompts``, sum over each answer of
    log pi - log ref, averaged. Read from the checkpoint store, after a run."""
    import torch

    from palm_rlhf.chat import encode_prompt, format_chat
    from palm_rlhf.checkpoint import CheckpointStore, load_palm
    from palm_rlhf.generation import SamplingParams, generate_tokens
    from palm_rlhf.rl.online import sequence_logps
    from palm_rlhf.tokenizer import load_tokenizer

    st = CheckpointStore(Path(data_dir) / "checkpoints", "policy")
    versions = st.versions()
    ref, manifest = load_palm(st.path(versions[0]), dtype=torch.float32)
    ref.eval()
    tok = load_tokenizer(manifest.get("tokenizer"))
    ids = [encode_prompt(tok, format_chat([{"role": "user", "content": q}])) for q in prompts]
    stops = tuple(sorted({tok.eos_id, *tok.encode("\n")[:1]}))
    params = [SamplingParams(n=samples, max_new_tokens=max_tokens, temperature=1.0, seed=seed + 1000 * i,
                             stop_token_ids=stops) for i in range(len(ids))]
    out: dict[str, float] = {}
    for v in versions:
        model, _ = load_palm(st.path(v), dtype=torch.float32)
        model.eval()
        results = generate_tokens(model, ids, params)
        rows = [(p, c) for p, r in zip(ids, results) for c in r if c.token_ids]
        ref_sum = sequence_logps(ref, [p for p, _ in rows], [c.token_ids for _, c in rows], pad_id=tok.pad_id)
        own = torch.tensor([sum(c.logprobs) for _, c in rows])
        out[v] = float((own - ref_sum).sum()) / max(sum(len(r) for r in results), 1)
    return out


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend; matplotlib is the optional ``plots``
    extra, so its absence is an error that says how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'palm-rlhf[plots]'"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_session(result: SessionResult, kls: dict[str, float], path: Path, title: str = "") -> Path:
    """The raters' score of served answers and the policy's KL to the reference, per measurement."""
    plt = _pyplot()
    ms = result.measurements
    x = [(m.at - ms[0].at) / 60 for m in ms]  # minutes since the first measurement
    fig, ax1 = plt.subplots(figsize=(8, 4.2))
    ax1.plot(x, [100 * m.score for m in ms], "o-", color="tab:green")
    ax1.set_ylabel("served answers the raters like (%)", color="tab:green")
    ax1.set_xlabel("minutes since the raters began (labels: policy / reward version served)")
    for xi, m in zip(x, ms):
        ax1.annotate(f"{m.policy_version}/{m.reward_version}", (xi, 100 * m.score), fontsize=6, rotation=60,
                     textcoords="offset points", xytext=(2, -28))
    ax2 = ax1.twinx()
    ax2.plot(x, [kls.get(m.policy_version.split("+")[-1], float("nan")) for m in ms], "s--", color="tab:red")
    ax2.set_ylabel("policy KL to the reference (nats per answer)", color="tab:red")
    fig.suptitle(title or "palm-rlhf up on its defaults: raters with a hidden taste")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
