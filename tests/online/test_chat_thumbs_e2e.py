"""A person's first chat on ``palm-rlhf up`` as started (no settings, no trigger): twelve turns
through the gateway at the chat page's settings, a thumb on every answer shown, and then nothing.
A round must start by itself, train the reward on the thumbs although no two of them share a
prompt (each turn's prompt is the whole conversation so far), and train the policy against the
shipped reward model on the prompts of that chat; the gate then decides. When it publishes, the
gateway must serve the new version.

It fails when rounds do not start by themselves, when the policy waits for a reward fitted on
feedback instead of training against the trained reward that ``up`` seeds, and when thumbs on
prompts never repeated are dropped."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import httpx
import pytest

from palm_rlhf.demo.corpus import generate_exchanges

from .up_process import up_on_defaults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _trainer_status(data_dir) -> dict:
    out = subprocess.run([sys.executable, "-m", "palm_rlhf.cli", "trainer", "status", "--data-dir", str(data_dir),
                          "--json"], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_one_chat_with_thumbs_trains_the_reward_and_the_policy_by_itself(tmp_path):
    data = tmp_path / "data"
    with up_on_defaults(data) as (url, lines), httpx.Client(base_url=url, timeout=300) as http:
        rng = random.Random(0)
        messages: list[dict] = []
        for exchange in generate_exchanges(7, 12, held_out=True):
            messages.append({"role": "user", "content": exchange.last.question})
            # the page's request: one answer shown, best of 4 candidates, temperature 0.8
            r = http.post("/v1/chat/completions", json={"messages": messages, "n": 1, "best_of": 4,
                                                        "temperature": 0.8})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["policy_version"] == "v0001"
            messages.append(body["choices"][0]["message"])
            verdict = "up" if rng.random() < 0.6 else "down"
            f = http.post("/v1/feedback", json={"completion_id": body["id"], "choice_index": 0, "thumbs": verdict})
            assert f.status_code == 200, f.text
        chat_ended = time.monotonic()
        # then nothing: the trainer starts a round 90 s after the last feedback by itself
        status = _trainer_status(data)
        while not status["last_outcome"] and time.monotonic() - chat_ended < 600:
            time.sleep(5)
            status = _trainer_status(data)
        rounds = [ln for ln in lines if "services.trainer.core: round " in ln]
        assert status["last_outcome"], "no round ended within 10 min; rounds:\n" + "\n".join(rounds)
        print(f"round ended {time.monotonic() - chat_ended:.0f}s after the last thumb: {status['last_outcome']}: "
              f"{status['last_message']}")
        assert any("starting a round" in ln for ln in lines)  # nothing was triggered by hand
        m = status["last_metrics"]
        # the thumbs were labels of the reward refit, though none met another on its prompt
        assert m["pairs_total"] == 0.0 and m["reward_train_thumbs"] >= 6, m
        # the policy trained against the seeded reward on the chat's prompts, and the gate judged it
        assert status["last_outcome"] in ("published", "rejected"), status["last_message"]
        assert m["train_seconds"] > 0 and m["prompts_total"] == 12 and "candidate_mean_reward" in m
        if status["last_outcome"] == "published":
            version = status["policy_version"]
            assert version == "v0002"
            from palm_rlhf.checkpoint import CheckpointStore

            gate = CheckpointStore(data / "checkpoints", "policy").manifest(version)["metadata"]["gate"]
            assert gate["passed"] and gate["candidate"]["mean_reward"] > gate["current"]["mean_reward"]
            served = ""
            deadline = time.monotonic() + 60
            while served != version and time.monotonic() < deadline:
                r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi!"}],
                                                            "max_tokens": 4})
                assert r.status_code == 200, r.text
                served = r.json()["policy_version"]
            assert served == version, "the gateway did not serve the published version"
        else:
            assert status["policy_version"] == "v0001" and m["gate_passed"] == 0.0
