"""``palm-rlhf score`` (text in, reward scores out) and ``palm-rlhf chat-client`` (a terminal
chat against the gateway, with feedback commands)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from services.common.config import DEFAULT_ADDRS, flag

SCORE_EPILOG = """\
examples:
  palm-rlhf score --reward-addr 127.0.0.1:50053 --prompt "User: hi\\nAssistant:" " Hello!" " Go away."
  palm-rlhf score --file in.jsonl --out scores.jsonl      # lines {"prompt": ..., "responses": [...]}
exit status: 0 ok, 1 the service failed, 2 bad input"""

CHAT_HELP = """commands:
  /up, /down        thumbs up / down for the answer shown
  /rate N           rate the answer shown from 1 to 5
  /prefer I J       candidate I is better than candidate J (indices as /candidates shows them)
  /candidates       every candidate of the last answer, best reward first
  /new              start a new conversation
  /help             this text
  /quit             leave (Ctrl-D works too)"""


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "score", help="score responses to a prompt with the reward service (gRPC)",
        description="Score responses with the reward service. Give a prompt and responses on the "
                    "command line, or a JSONL file of {\"prompt\", \"responses\"} lines.",
        epilog=SCORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flag(s, "--reward-addr", default=DEFAULT_ADDRS["reward"],
         help="reward service host:port (PALM_RLHF_REWARD_ADDR); default: the reward service of the "
              f"'palm-rlhf up' running on --data-dir, else {DEFAULT_ADDRS['reward']}")
    _data_dir_flag(s)
    s.add_argument("--prompt", help="the prompt the responses answer (may be empty for the sentiment scorer)")
    s.add_argument("responses", nargs="*", help="responses to score")
    s.add_argument("--file", help="JSONL input, one {\"prompt\": str, \"responses\": [str, ...]} per line ('-' = stdin)")
    s.add_argument("--out", default="-", help="where batch results go (default: standard output)")
    s.add_argument("--scorer", default=None, help="scorer name (e.g. learned, sentiment); default: the service's")
    s.add_argument("--all-scorers", action="store_true", help="also report every scorer's score per response")
    s.add_argument("--json", action="store_true", help="print the single-prompt result as one JSON object")
    s.add_argument("--batch-size", type=int, default=32,
                   help="most responses sent in one request in batch mode (default 32)")
    s.add_argument("--timeout", type=float, default=30.0, help="deadline of each request in seconds, retries included")
    s.add_argument("--retries", type=int, default=4, help="retries of a request while the service is unavailable")
    s.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca-cert)")
    s.add_argument("--ca-cert", help="PEM file of the certificate authority that signed the server's certificate")
    s.set_defaults(func=_score)

    c = subparsers.add_parser(
        "chat-client", help="chat with the gateway in the terminal and give feedback",
        description="A terminal chat against a running gateway: shows the best of n candidates with "
                    "its reward and lets you rate it.\n\n" + CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flag(c, "--url", dest="gateway_url", default="http://127.0.0.1:8000",
         help="gateway URL (PALM_RLHF_GATEWAY_URL); default: the gateway of the 'palm-rlhf up' running on "
              "--data-dir, else http://127.0.0.1:8000")
    _data_dir_flag(c)
    flag(c, "--api-key", default=None,
         help="API key, when the gateway requires one (PALM_RLHF_API_KEY)")
    c.add_argument("--best-of", type=int, default=4, help="candidates sampled and ranked per answer (default 4)")
    c.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the policy's)")
    c.add_argument("--max-tokens", type=int, default=None, help="longest answer in tokens (default: the policy's)")
    c.add_argument("--system", default=None, help="a system message that starts the conversation")
    c.add_argument("--once", metavar="MESSAGE", help="send one message, print the answer and exit")
    c.add_argument("--json", action="store_true", help="with --once: print the whole response as JSON")
    c.add_argument("--timeout", type=float, default=120.0, help="HTTP timeout in seconds")
    c.set_defaults(func=_chat)


def _data_dir_flag(p: argparse.ArgumentParser) -> None:
    flag(p, "--data-dir", type=Path, default=Path("./data"),
         help="data directory of a running 'palm-rlhf up', whose DATA_DIR/addresses.json gives the address "
              "when none is set (PALM_RLHF_DATA_DIR, default ./data)")


# --------------------------------------------------------------------------------------------
# score


class InputError(ValueError):
    """A malformed input line (exit status 2)."""


def read_jsonl(f: IO[str]) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, prompt, responses) for each non-blank line; InputError on a bad one."""
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"line {lineno}: not JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise InputError(f"line {lineno}: expected an object with \"prompt\" and \"responses\"")
        prompt = obj.get("prompt", "")
        responses = obj.get("responses")
        if not isinstance(prompt, str):
            raise InputError(f"line {lineno}: \"prompt\" must be a string")
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            raise InputError(f"line {lineno}: \"responses\" must be a non-empty list of strings")
        yield lineno, prompt, responses


def _batches(lines: Iterator[tuple[int, str, list[str]]], size: int) -> Iterator[list[tuple[int, str, list[str]]]]:
    """Group lines into requests of at most ``size`` responses (a longer line goes alone)."""
    batch: list[tuple[int, str, list[str]]] = []
    count = 0
    for item in lines:
        if batch and count + len(item[2]) > size:
            yield batch
            batch, count = [], 0
        batch.append(item)
        count += len(item[2])
    if batch:
        yield batch


def _result_dict(prompt: str, responses: list[str], r, all_scorers: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": prompt, "responses": responses, "scores": r.scores, "scorer": r.scorer,
                           "reward_version": r.reward_version}
    if all_scorers:
        out["breakdown"] = [d.breakdown for d in r.details]
    return out


def _score(args: argparse.Namespace) -> int:
    from clients import ClientError, RetryPolicy, RewardClient, TLSConfig

    if args.file and (args.responses or args.prompt is not None):
        print("error: give either --file or --prompt with responses, not both", file=sys.stderr)
        return 2
    if not args.file and not args.responses:
        print("error: nothing to score: give responses after --prompt, or --file in.jsonl", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    tls = TLSConfig(root_certificates=args.ca_cert) if (args.tls or args.ca_cert) else None
    from services.common.settings import ClientSettings, build_settings

    settings = build_settings(ClientSettings, args)
    args.reward_addr = settings.reward_addr
    client = RewardClient(args.reward_addr, timeout=args.timeout, tls=tls,
                          retry=RetryPolicy(max_attempts=max(1, args.retries + 1)))
    try:
        if not args.file:
            prompt = args.prompt or ""
            r = client.score(prompt, args.responses, args.scorer, all_scorers=args.all_scorers)
            if args.json:
                print(json.dumps(_result_dict(prompt, args.responses, r, args.all_scorers), ensure_ascii=False))
            else:
                for text, d in zip(args.responses, r.details):
                    extra = "  " + " ".join(f"{k}={v:.4f}" for k, v in sorted(d.breakdown.items())) \
                        if args.all_scorers else ""
                    print(f"{d.score:+.4f}\t{text}{extra}")
                print(f"# scorer {r.scorer}" + (f", reward version {r.reward_version}" if r.reward_version else ""),
                      file=sys.stderr)
            return 0
        return _score_file(client, args)
    except InputError as e:
        print(f"error: {args.file}: {e}", file=sys.stderr)
        return 2
    except ClientError as e:
        print(f"error: reward service at {args.reward_addr}{settings.where('reward_addr')}: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _score_file(client, args: argparse.Namespace) -> int:
    """Batch mode. Output goes to ``OUT.tmp`` and is renamed at the end, so a failure half-way
    never leaves a partial result under the real name."""
    tmp = None if args.out == "-" else args.out + ".tmp"
    n = 0
    with contextlib.ExitStack() as stack:
        src = sys.stdin if args.file == "-" else stack.enter_context(open(args.file, encoding="utf-8"))
        out = sys.stdout if tmp is None else stack.enter_context(open(tmp, "w", encoding="utf-8"))
        if tmp is not None:
            stack.callback(lambda: os.path.exists(tmp) and os.unlink(tmp))  # only left on failure
        for batch in _batches(read_jsonl(src), args.batch_size):
            results = client.score_batch([(p, rs) for _, p, rs in batch], args.scorer, all_scorers=args.all_scorers)
            for (_, p, rs), r in zip(batch, results):
                out.write(json.dumps(_result_dict(p, rs, r, args.all_scorers), ensure_ascii=False) + "\n")
                n += 1
        out.flush()
        if tmp is not None:
            os.replace(tmp, args.out)
    print(f"scored {n} line(s)", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# chat-client


class ChatSession:
    """The state of one terminal conversation: the messages so far and the last answer."""

    def __init__(self, client, best_of: int, temperature: float | None, max_tokens: int | None,
                 system: str | None, out: IO[str]):
        self.client = client
        self.best_of = best_of
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.system = system
        self.out = out
        self.messages: list[dict[str, str]] = []
        self.last: dict[str, Any] | None = None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def ask(self, text: str) -> dict[str, Any]:
        self.messages.append({"role": "user", "content": text})
        try:
            resp = self.client.chat(self.messages, best_of=self.best_of, temperature=self.temperature,
                                    max_tokens=self.max_tokens)
        except Exception:
            self.messages.pop()  # the turn did not happen
            raise
        answer = resp["choices"][0]["message"]["content"]
        self.messages.append({"role": "assistant", "content": answer})
        self.last = resp
        return resp

    def show(self, resp: dict[str, Any]) -> None:
        choice = resp["choices"][0]
        reward = choice.get("reward")
        reward_text = f"{reward:+.3f}" if isinstance(reward, (int, float)) else "n/a"
        self.say(f"assistant: {choice['message']['content']}")
        self.say(f"  [reward {reward_text}, best of {resp.get('best_of', '?')}, "
                 f"policy {resp.get('policy_version') or '?'}]")

    def command(self, line: str) -> bool:
        """Run a /command; False when the user wants to leave."""
        parts = line.split()
        cmd, rest = parts[0].lower(), parts[1:]
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/help":
            self.say(CHAT_HELP)
            return True
        if cmd == "/new":
            self.reset()
            self.say("(new conversation)")
            return True
        if self.last is None:
            self.say("nothing to give feedback on yet: send a message first")
            return True
        cid = self.last["id"]
        if cmd in ("/up", "/down") and not rest:
            self.client.feedback(cid, thumbs=cmd[1:])
            self.say(f"(thumbs {cmd[1:]} recorded)")
        elif cmd == "/rate" and len(rest) == 1 and rest[0].isdigit() and 1 <= int(rest[0]) <= 5:
            self.client.feedback(cid, rating=int(rest[0]))
            self.say(f"(rating {rest[0]} recorded)")
        elif cmd == "/prefer" and len(rest) == 2 and all(r.isdigit() for r in rest):
            i, j = int(rest[0]), int(rest[1])
            self.client.feedback(cid, preferred_index=i, rejected_index=j)
            self.say(f"(preference {i} over {j} recorded)")
        elif cmd == "/candidates":
            rec = self.client.completion(cid)
            self.say(f"completion {cid} (best of {rec.get('best_of')}; * = shown):")
            for c in rec["candidates"]:
                reward = c.get("reward")
                mark = "*" if c.get("shown") else " "
                r = f"{reward:+.3f}" if isinstance(reward, (int, float)) else "  n/a "
                self.say(f"{mark}[{c['index']}] {r}  {c['text']}")
        else:
            self.say(f"unknown or malformed command {line.strip()!r}; /help lists the commands")
        return True


def _chat(args: argparse.Namespace) -> int:
    import logging

    from clients import GatewayClient, GatewayError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the chat
    if args.best_of < 1:
        print("error: --best-of must be >= 1", file=sys.stderr)
        return 2
    from services.common.settings import ClientSettings, build_settings

    settings = build_settings(ClientSettings, args)
    client = GatewayClient(settings.gateway_url, settings.api_key, timeout=args.timeout)
    session = ChatSession(client, args.best_of, args.temperature, args.max_tokens, args.system, sys.stdout)
    try:
        if args.once is not None:
            try:
                resp = session.ask(args.once)
            except GatewayError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(resp, ensure_ascii=False))
            else:
                session.show(resp)
            return 0
        interactive = sys.stdin.isatty()
        if interactive:
            session.say(f"chatting with {settings.gateway_url} (best of {args.best_of}); /help for commands, /quit to leave")
        while True:
            try:
                line = input("you: " if interactive else "")
            except EOFError:
                return 0
            if not line.strip():
                continue
            try:
                if line.lstrip().startswith("/"):
                    if not session.command(line.strip()):
                        return 0
                else:
                    session.show(session.ask(line))
            except GatewayError as e:
                session.say(f"error: {e}")
    finally:
        client.close()
