"""``palm-rlhf score`` and ``palm-rlhf chat-client`` run as subprocesses against real services."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import httpx
import pytest

from clients import RewardClient

harness = sys.modules["palm_rlhf_test_harness"]  # loaded by conftest.py


def cli(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "palm_rlhf.cli", *args], input=input, capture_output=True, check=False,
                          text=True, timeout=timeout, cwd=harness.REPO)


PROMPT = "User: how was your day?\nAssistant:"


def test_score_command_prints_the_service_scores_in_order(reward_addr):
    responses = [" Lovely, thank you!", " Dreadful.", " fine"]
    r = cli("score", "--reward-addr", reward_addr, "--prompt", PROMPT, *responses)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split("\t", 1)[1] for line in lines] == responses
    printed = [float(line.split("\t", 1)[0]) for line in lines]
    with RewardClient(reward_addr) as rc:
        expected = rc.score(PROMPT, responses).scores
    assert printed == pytest.approx(expected, abs=1e-4)

    j = cli("score", "--reward-addr", reward_addr, "--scorer", "sentiment", "--json", "--prompt", "", *responses)
    assert j.returncode == 0, j.stderr
    obj = json.loads(j.stdout)
    assert obj["scorer"] == "sentiment" and obj["responses"] == responses
    assert obj["scores"][0] > 0 > obj["scores"][1]


def test_score_command_batch_file_writes_one_jsonl_line_per_input_line(reward_addr, tmp_path):
    items = [
        {"prompt": "User: a\nAssistant:", "responses": [" one", " two", " three"]},
        {"prompt": "User: b\nAssistant:", "responses": [" four"]},
        {"prompt": "", "responses": [" I love sunny days!", " rain again, awful"]},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(i) for i in items) + "\n\n")
    out = tmp_path / "scores.jsonl"
    # batch size 2 splits the file into several requests; the output must still line up
    r = cli("score", "--reward-addr", reward_addr, "--file", str(src), "--out", str(out), "--batch-size", "2",
            "--scorer", "sentiment")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "scores.jsonl.tmp").exists()
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["responses"] for g in got] == [i["responses"] for i in items]
    with RewardClient(reward_addr) as rc:
        for g, i in zip(got, items):
            assert g["scores"] == pytest.approx(rc.score(i["prompt"], i["responses"], "sentiment").scores, abs=1e-6)

    stdout_run = cli("score", "--reward-addr", reward_addr, "--file", "-", "--scorer", "sentiment",
                     input=src.read_text())
    assert stdout_run.returncode == 0
    assert [json.loads(x)["scores"] for x in stdout_run.stdout.splitlines()] == [g["scores"] for g in got]


@pytest.mark.parametrize(
    "line, why",
    [("not json", "not JSON"), ('{"prompt": "p"}', "responses"), ('{"prompt": 3, "responses": ["a"]}', "prompt"),
     ('{"prompt": "p", "responses": []}', "responses"), ('{"prompt": "p", "responses": ["a", 1]}', "responses"),
     ("[1, 2]", "object")],
)
def test_jsonl_reader_names_the_malformed_line(line, why):
    from clients.cli import InputError, read_jsonl

    src = io.StringIO('{"prompt": "p", "responses": ["ok"]}\n\n' + line + "\n")
    with pytest.raises(InputError, match=f"line 3: .*{why}"):
        list(read_jsonl(src))


def test_score_command_exits_2_on_a_malformed_line_and_writes_nothing(reward_addr, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "p", "responses": ["ok"]}\n{"prompt": "p", "responses": "not a list"}\n')
    r = cli("score", "--reward-addr", reward_addr, "--file", str(src), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2
    assert "line 2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.jsonl").exists()  # no partial result under the real name


def test_score_command_fails_cleanly_when_the_service_is_down():
    port = harness.free_port()
    t0 = time.monotonic()
    r = cli("score", "--reward-addr", f"127.0.0.1:{port}", "--timeout", "2", "--retries", "2", "--prompt", "p", "r")
    assert r.returncode == 1
    assert "UNAVAILABLE" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30


def test_chat_client_once_prints_the_best_answer_with_its_reward(gateway):
    r = cli("chat-client", "--url", gateway.url, "--best-of", "3", "--max-tokens", "6", "--once", "hello there")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("assistant: ")
    assert "best of 3" in r.stdout and "reward " in r.stdout
    j = cli("chat-client", "--url", gateway.url, "--best-of", "3", "--max-tokens", "6", "--once", "hi", "--json")
    resp = json.loads(j.stdout)
    assert resp["best_of"] == 3 and len(resp["choices"]) == 1


def test_chat_client_session_records_every_kind_of_feedback(gateway):
    script = "/up\nhello\n/candidates\n/up\n/rate 4\n/prefer 1 0\n/rate 9\n/quit\nnever sent\n"
    r = cli("chat-client", "--url", gateway.url, "--best-of", "3", "--max-tokens", "6", input=script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "nothing to give feedback on yet" in out  # /up before any answer
    assert out.count("assistant: ") == 1  # the line after /quit was never sent
    shown = [line for line in out.splitlines() if line.startswith(("*[", " ["))]
    assert len(shown) == 3 and shown[0].startswith("*[0]")
    assert "unknown or malformed command '/rate 9'" in out

    # the gateway stored exactly the three valid feedback rows on the last completion
    ids = {line.split()[1] for line in out.splitlines() if line.startswith("completion chatcmpl-")}
    assert len(ids) == 1, out
    assert "HTTP Request" not in r.stderr  # no library chatter in the terminal
    rows = httpx.get(f"{gateway.url}/v1/feedback", params={"completion_id": ids.pop()}).json()["data"]
    assert sorted((f["kind"], f.get("thumbs"), f.get("rating"), f.get("preferred_index")) for f in rows) == [
        ("preference", None, None, 1), ("rating", None, 4, None), ("thumbs", "up", None, None)]


def test_a_twelve_turn_chat_client_session_never_fails_for_length(gateway):
    # each line alone fits the tiny model's context; twelve of them with their answers do not
    lines = [f"turn {i}: " + "tell me more about the garden " * 2 for i in range(12)]
    r = cli("chat-client", "--url", gateway.url, "--best-of", "2", "--max-tokens", "6",
            input="\n".join([*lines, "/quit"]) + "\n", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("assistant: ") == 12, r.stdout[-3000:]
    assert "error" not in r.stdout.lower() and "exceed" not in r.stdout.lower(), r.stdout[-3000:]
