"""A closed-loop demonstration: simulated users teach the served policy what they like.

``palm-rlhf demo-loop --data-dir DIR`` starts the whole system (``palm-rlhf up``: policy,
reference, reward, trainer running the online loop, and the gateway), then repeats:

1. simulated users, each with a stated taste (they like cheerful answers, as measured by
   VADER's compound score), chat through the gateway with held-out demo questions, asking for
   2-4 candidates (``n = best_of``) and leaving feedback: thumbs up on an answer whose
   compound score is above a threshold and down otherwise, and a preference between the two
   candidates whose scores differ most;
2. the trainer is triggered (one update round: reward refit, policy update, gate, publish);
3. the policy version now served is measured on a fixed set of held-out prompts, sampled with
   fixed seeds: the mean sentiment of its answers, its KL to the reference, answer length.

It prints the figures per policy version and draws them into ``DATA_DIR/demo-loop.png``.
The users never see the measuring prompts, and the trainer never sees the users' taste, only
their clicks (and, with ``--reward-scorer sentiment``, a rule-based reward standing in for it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DemoLoopConfig:
    data_dir: Path
    rounds: int = 3
    users: int = 4
    chats_per_user: int = 8  # chats per user per round
    min_best_of: int = 2
    max_best_of: int = 4
    max_tokens: int = 48  # answer length limit (tokens; the demo model writes one short line)
    threshold: float = 0.05  # VADER compound above this earns a thumbs up
    eval_prompts: int = 48  # fixed held-out prompts the measurement samples
    eval_samples: int = 2  # seeded samples per measuring prompt
    gate_prompts: int = 32  # fixed held-out prompts for the trainer's gate (PALM_RLHF_EVAL_PROMPTS_FILE)
    reward_scorer: str = "sentiment"  # the trainer's training reward (PALM_RLHF_REWARD_SCORER)
    serve_scorer: str = "learned"  # the reward service's default scorer (ranks best-of in the gateway)
    algorithm: str = "rloo"
    seed: int = 0
    port: int = 0  # gateway port; 0 picks a free one
    plot: bool = True
    trainer_env: dict[str, str] = field(default_factory=dict)  # extra PALM_RLHF_* settings for the loop
    ready_timeout: float = 600.0
    start_checkpoint: Path | None = None  # policy to start from (default: the shipped demo model)


@dataclass
class VersionFigures:
    version: str
    round: int
    mean_sentiment: float
    kl: float  # mean over answers of sum_t [log pi - log ref], nats per answer
    mean_length: float  # tokens
    positive_fraction: float
    samples: list[str] = field(default_factory=list)


@dataclass
class DemoResult:
    versions: list[VersionFigures]
    rounds: list[dict[str, Any]]
    plot_path: Path | None

    @property
    def first(self) -> VersionFigures:
        return self.versions[0]

    @property
    def last(self) -> VersionFigures:
        return self.versions[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"versions": [asdict(v) for v in self.versions], "rounds": self.rounds,
                "plot_path": str(self.plot_path) if self.plot_path else None}


def create_sync_channel(addr: str):
    """A channel from the services' channel factory (the demo talks to its own services)."""
    from services.common.client import create_sync_channel as channel

    return channel(addr)


def _seed_policy_store(data_dir: Path, start: Path) -> None:
    """Make ``start`` the first policy version of a fresh data directory (the services would
    otherwise seed it with the shipped demo model)."""
    from palm_rlhf.checkpoint import CheckpointStore, load_palm

    st = CheckpointStore(data_dir / "checkpoints", "policy")
    if st.current() is not None:
        return
    model, manifest = load_palm(start)
    st.save(model, manifest["config"], tokenizer=manifest.get("tokenizer"), metadata={"seeded_from": str(start)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _System:
    """``palm-rlhf up`` as a child process, with the addresses it reports."""

    START = re.compile(r"started (\w+) \(pid \d+\) on (\S+)")

    def __init__(self, cfg: DemoLoopConfig, env: dict[str, str], say: Callable[[str], None], verbose: bool = False):
        self.cfg = cfg
        self.port = cfg.port or _free_port()
        self.addrs: dict[str, str] = {}
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.verbose = verbose
        # the admin token reaches `up` (and its children) in the environment, never on argv
        cmd = [sys.executable, "-m", "palm_rlhf.cli", "up", "--data-dir", str(cfg.data_dir), "--port",
               str(self.port), "--free-ports", "--scorer",
               cfg.serve_scorer, "--rate-limit", "1000000", "--grace", "5", "--ready-timeout",
               str(cfg.ready_timeout)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=env, start_new_session=True)
        self.say = say
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            m = self.START.search(line)
            if m:
                self.addrs[m.group(1)] = m.group(2)
            if "| ready: " in line:
                self.ready.set()
            if self.verbose or "services.trainer.loop" in line:
                self.say("  " + line)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.ready_timeout
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None:
                raise RuntimeError("the services exited before becoming ready:\n" + "\n".join(self.lines[-40:]))
            if time.monotonic() > deadline:
                raise TimeoutError("the services did not become ready in time:\n" + "\n".join(self.lines[-40:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(timeout=5)


# --- simulated users --------------------------------------------------------------------------


class SimulatedUser:
    """Someone who likes cheerful answers: VADER's compound score is their taste."""

    def __init__(self, user_id: int, prompts: Sequence[str], analyzer: Any, threshold: float, rng: random.Random):
        self.id = user_id
        self.prompts = list(prompts)
        self.vader = analyzer
        self.threshold = threshold
        self.rng = rng

    def taste(self, text: str) -> float:
        return float(self.vader.polarity_scores(text)["compound"])

    def chat(self, http: Any, cfg: DemoLoopConfig) -> dict[str, int]:
        """One conversation turn and its feedback; returns counts of what was sent."""
        k = self.rng.randint(cfg.min_best_of, cfg.max_best_of)
        question = self.rng.choice(self.prompts)
        r = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": question}], "n": k, "best_of": k,
            "max_tokens": cfg.max_tokens, "seed": self.rng.randrange(2**31), "user": f"sim-{self.id}",
        })
        r.raise_for_status()
        body = r.json()
        choices = body["choices"]
        scores = [self.taste(c["message"]["content"]) for c in choices]
        sent = {"thumbs": 0, "preference": 0}
        for c, s in zip(choices, scores):
            fb = http.post("/v1/feedback", json={"completion_id": body["id"], "choice_index": c["index"],
                                                 "thumbs": "up" if s > self.threshold else "down"})
            fb.raise_for_status()
            sent["thumbs"] += 1
        if len(choices) >= 2:
            hi = max(range(len(choices)), key=lambda i: scores[i])
            lo = min(range(len(choices)), key=lambda i: scores[i])
            if scores[hi] - scores[lo] > 0.1:
                fb = http.post("/v1/feedback", json={"completion_id": body["id"],
                                                     "preferred_index": choices[hi]["index"],
                                                     "rejected_index": choices[lo]["index"]})
                fb.raise_for_status()
                sent["preference"] += 1
        return sent


# --- measuring the served policy -----------------------------------------------------------------


def measure_policy(policy_addr: str, reference_addr: str, prompts: Sequence[str], samples: int, max_tokens: int,
                   analyzer: Any, seed: int = 1234, round_no: int = 0) -> VersionFigures:
    """Sample the policy service on ``prompts`` with fixed seeds (the same seeds for every
    version), then score the answers with VADER and their KL to the reference service."""
    from concurrent.futures import ThreadPoolExecutor

    from palm_rlhf.chat import clean_response, format_chat
    from palm_rlhf.proto.v1 import policy_pb2, policy_pb2_grpc, reference_pb2, reference_pb2_grpc

    texts, kls, lengths = [], [], []
    with create_sync_channel(policy_addr) as pch, create_sync_channel(reference_addr) as rch:
        policy = policy_pb2_grpc.PolicyStub(pch)
        reference = reference_pb2_grpc.ReferenceStub(rch)

        def sample(i: int):
            # one request (and seed) per prompt: a request's seed drives every prompt in it alike
            req = policy_pb2.GenerateRequest(
                prompts=[policy_pb2.Prompt(text=format_chat([{"role": "user", "content": prompts[i]}]))],
                params=policy_pb2.SamplingParams(n=samples, temperature=1.0, max_new_tokens=max_tokens,
                                                 stop=["\n"], seed=seed + 1000 * i, return_logprobs=True),
            )
            return policy.Generate(req, timeout=300)

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(sample, range(len(prompts))))
        versions = {r.policy_version for r in replies}
        if len(versions) != 1:
            raise RuntimeError(f"the policy changed version while being measured: {sorted(versions)}")
        version = versions.pop()
        seqs, owners = [], []
        for reply in replies:
            res = reply.results[0]
            for c in res.candidates:
                texts.append(clean_response(c.text))
                lengths.append(len(c.token_ids))
                if c.token_ids:
                    seqs.append(reference_pb2.TokenSequence(prompt_token_ids=list(res.prompt_token_ids),
                                                            response_token_ids=list(c.token_ids)))
                    owners.append(list(c.logprobs))
                else:
                    kls.append(0.0)
        for s in range(0, len(seqs), 32):
            ref = reference.LogProbs(reference_pb2.LogProbsRequest(sequences=seqs[s : s + 32]), timeout=300)
            for lp, r in zip(owners[s : s + 32], ref.results):
                kls.append(sum(a - b for a, b in zip(lp, r.logprobs)))
    sentiments = [float(analyzer.polarity_scores(t)["compound"]) for t in texts]
    return VersionFigures(
        version=version, round=round_no, mean_sentiment=sum(sentiments) / len(sentiments),
        kl=sum(kls) / len(kls), mean_length=sum(lengths) / len(lengths),
        positive_fraction=sum(s > 0.05 for s in sentiments) / len(sentiments), samples=texts[:3],
    )


def _policy_version(policy_addr: str) -> str:
    from palm_rlhf.proto.v1 import common_pb2, policy_pb2_grpc

    with create_sync_channel(policy_addr) as ch:
        return policy_pb2_grpc.PolicyStub(ch).ModelInfo(common_pb2.ModelInfoRequest(), timeout=30).version


def _wait_policy_version(policy_addr: str, version: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _policy_version(policy_addr) != version:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the policy service did not switch to {version} within {timeout}s")
        time.sleep(0.2)


def _trigger(trainer_addr: str, token: str) -> Any:
    from palm_rlhf.proto.v1 import trainer_pb2, trainer_pb2_grpc

    with create_sync_channel(trainer_addr) as ch:
        return trainer_pb2_grpc.TrainerStub(ch).Trigger(trainer_pb2.TriggerRequest(wait=True), timeout=3600,
                                                         metadata=(("authorization", f"Bearer {token}"),))


def plot_figures(versions: Sequence[VersionFigures], path: Path) -> Path:
    """Mean sentiment (the users' taste) and KL to the reference, per served policy version."""
    from palm_rlhf.demo.taste import _pyplot

    plt = _pyplot()

    x = list(range(len(versions)))
    labels = [v.version or f"#{i}" for i, v in enumerate(versions)]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(x, [v.mean_sentiment for v in versions], "o-", color="tab:green", label="mean sentiment (VADER)")
    ax1.set_ylabel("mean sentiment of served answers", color="tab:green")
    ax1.set_xticks(x, labels)
    ax1.set_xlabel("policy version")
    ax2 = ax1.twinx()
    ax2.plot(x, [v.kl for v in versions], "s--", color="tab:red", label="KL to reference")
    ax2.set_ylabel("KL to the reference (nats per answer)", color="tab:red")
    fig.suptitle("palm-rlhf online loop: simulated users who like cheerful answers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo_loop(cfg: DemoLoopConfig, say: Callable[[str], None] = print) -> DemoResult:
    """Run the demonstration end to end (see the module docstring)."""
    import httpx
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from palm_rlhf.demo.corpus import held_out_prompts

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the figures
    if cfg.plot:  # fail before the loop runs, not after it
        from palm_rlhf.demo.taste import _pyplot

        _pyplot()
    cfg.data_dir = Path(cfg.data_dir).resolve()
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    analyzer = SentimentIntensityAnalyzer()
    pool = held_out_prompts(seed=cfg.seed, count=300)
    eval_prompts = pool[-cfg.eval_prompts :]
    # the trainer's gate gets its own fixed prompts (neither the users' nor the measurement's)
    gate_prompts = pool[-cfg.eval_prompts - cfg.gate_prompts : -cfg.eval_prompts]
    user_prompts = pool[: len(pool) - cfg.eval_prompts - cfg.gate_prompts]
    gate_file = cfg.data_dir / "gate-prompts.txt"
    gate_file.write_text("".join(q + "\n" for q in gate_prompts), encoding="utf-8")
    from services.common.settings import DemoSettings

    demo = DemoSettings.load()
    token = demo.admin_token or secrets.token_urlsafe(24)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PALM_RLHF_ADMIN_TOKEN=token,
               PALM_RLHF_UPDATE_FN="services.trainer.loop:make_update_fn",
               PALM_RLHF_REWARD_SCORER=cfg.reward_scorer, PALM_RLHF_RL_ALGORITHM=cfg.algorithm,
               PALM_RLHF_RL_MAX_NEW_TOKENS=str(cfg.max_tokens),
               # this demo triggers its rounds itself, one per batch of chats
               PALM_RLHF_ROUND_AFTER_FEEDBACK="0", PALM_RLHF_ROUND_AFTER_SECONDS="0")
    env.setdefault("PALM_RLHF_RL_LR", "2e-3")
    env.setdefault("PALM_RLHF_EVAL_PROMPTS_FILE", str(gate_file))
    env.setdefault("PALM_RLHF_EVAL_PROMPTS", str(cfg.gate_prompts))  # a few rounds of a few minutes each should show the trend
    # the demo's held-out human pairs number about ten: one pair flipping is 0.1 of noise
    env.setdefault("PALM_RLHF_GATE_PAIR_TOLERANCE", "0.1")
    env.update(cfg.trainer_env)
    if cfg.start_checkpoint is not None:
        _seed_policy_store(cfg.data_dir, Path(cfg.start_checkpoint))
    say(f"demo-loop: starting the services in {cfg.data_dir}")
    system = _System(cfg, env, say, verbose=demo.demo_verbose)
    rounds: list[dict[str, Any]] = []
    versions: list[VersionFigures] = []
    rng = random.Random(cfg.seed)
    try:
        system.wait_ready()
        addrs = system.addrs
        say(f"demo-loop: ready (gateway http://127.0.0.1:{system.port}, trainer {addrs['trainer']})")

        def measure(round_no: int) -> VersionFigures:
            v = measure_policy(addrs["policy"], addrs["reference"], eval_prompts, cfg.eval_samples, cfg.max_tokens,
                               analyzer, seed=cfg.seed * 7 + 1234, round_no=round_no)
            say(f"demo-loop: policy {v.version}: mean sentiment {v.mean_sentiment:+.3f}, positive "
                f"{v.positive_fraction:.0%}, KL to reference {v.kl:.3f} nats, length {v.mean_length:.1f} tokens; "
                f"e.g. {v.samples[0]!r}")
            return v

        versions.append(measure(0))
        users = [SimulatedUser(i, user_prompts, analyzer, cfg.threshold, random.Random(rng.randrange(2**31)))
                 for i in range(cfg.users)]
        with httpx.Client(base_url=f"http://127.0.0.1:{system.port}", timeout=300) as http:
            for rnd in range(1, cfg.rounds + 1):
                t0 = time.monotonic()
                counts = {"chats": 0, "thumbs": 0, "preference": 0}
                for _ in range(cfg.chats_per_user):
                    for u in users:
                        sent = u.chat(http, cfg)
                        counts["chats"] += 1
                        for k, n in sent.items():
                            counts[k] += n
                say(f"demo-loop: round {rnd}: {counts['chats']} chats, {counts['thumbs']} thumbs, "
                    f"{counts['preference']} preferences ({time.monotonic() - t0:.0f}s); training...")
                t1 = time.monotonic()
                reply = _trigger(addrs["trainer"], token)
                info = {"round": rnd, **counts, "published": reply.published, "version": reply.policy_version,
                        "message": reply.message, "metrics": dict(reply.metrics),
                        "train_seconds": time.monotonic() - t1}
                rounds.append(info)
                say(f"demo-loop: round {rnd}: {reply.message} ({info['train_seconds']:.0f}s)")
                if reply.published:
                    _wait_policy_version(addrs["policy"], reply.policy_version)
                    versions.append(measure(rnd))
    finally:
        system.stop()
    plot_path = None
    if cfg.plot and versions:
        plot_path = plot_figures(versions, cfg.data_dir / "demo-loop.png")
    say("")
    say(f"{'version':<9}{'round':>6}{'sentiment':>11}{'positive':>10}{'KL':>8}{'length':>8}")
    for v in versions:
        say(f"{v.version:<9}{v.round:>6}{v.mean_sentiment:>+11.3f}{v.positive_fraction:>10.0%}{v.kl:>8.3f}"
            f"{v.mean_length:>8.1f}")
    if plot_path:
        say(f"plot: {plot_path}")
    result = DemoResult(versions, rounds, plot_path)
    (cfg.data_dir / "demo-loop.json").write_text(json.dumps(result.to_dict(), indent=1, default=_nan_safe))
    return result


def _nan_safe(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else str(x)
