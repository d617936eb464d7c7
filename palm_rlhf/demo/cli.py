"""``palm-rlhf chat`` (talk to a checkpoint in the terminal) and ``palm-rlhf demo-build``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DEFAULT_HISTORY_TURNS = 3  # earlier exchanges kept in the prompt; older ones are dropped first


def register(subparsers: Any) -> None:
    _register_chat(subparsers)
    _register_build(subparsers)
    _register_eval(subparsers)
    _register_users(subparsers)


def _register_chat(subparsers: Any) -> None:
    """``palm-rlhf chat``."""
    chat = subparsers.add_parser(
        "chat",
        help="chat with the demo model (or any checkpoint) in the terminal",
        description=(
            "Chat with a PaLM checkpoint in the terminal. Each line you type becomes a user turn; "
            "the conversation so far (the last few turns) is rendered in the chat format and the "
            "model's answer is sampled up to its end-of-sequence token. Type /reset to forget the "
            "conversation; Ctrl-D or Ctrl-C quits."
        ),
    )
    from services.common.config import flag

    flag(
        chat,
        "--checkpoint",
        default=None,
        help="checkpoint folder (env PALM_RLHF_CHECKPOINT; default: the shipped demo model)",
    )
    chat.add_argument("--once", metavar="MESSAGE", help="answer this one message, print the answer and exit")
    chat.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)"
    )
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass, 1 = off (default 0.9)")
    chat.add_argument(
        "--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)"
    )
    chat.add_argument(
        "--max-new-tokens", type=int, default=160, help="answer length limit in tokens (default 160)"
    )
    chat.add_argument("--seed", type=int, default=None, help="sampling seed for reproducible answers")
    chat.add_argument(
        "--history-turns",
        type=int,
        default=DEFAULT_HISTORY_TURNS,
        help=f"earlier exchanges kept in the prompt (default {DEFAULT_HISTORY_TURNS})",
    )
    flag(
        chat,
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "auto"),
        help="device (env PALM_RLHF_DEVICE; default cpu)",
    )
    chat.add_argument(
        "--int8",
        action="store_true",
        help="weight-only int8 decode steps on the CPU (PaLM.quantize_int8): about twice as fast, "
        "answers from the quantized weights",
    )
    chat.set_defaults(func=run_chat)


def _register_build(subparsers: Any) -> None:
    """``palm-rlhf demo-build``."""
    build = subparsers.add_parser(
        "demo-build",
        help="pretrain the demo model on the template corpus and save it as a checkpoint",
        description=(
            "Generate the demo corpus and pretrain the 'demo' PaLM preset on it (a few minutes on "
            "two CPU cores), then save a policy checkpoint folder. The defaults are the recipe of "
            "the shipped model."
        ),
    )
    from palm_rlhf.demo.recipe import DemoTrainConfig  # a dataclass only: keeps --help fast

    d = DemoTrainConfig()
    build.add_argument("--out", required=True, help="checkpoint folder to create")
    build.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    build.add_argument(
        "--seed", type=int, default=d.seed, help=f"corpus and training seed (default {d.seed})"
    )
    build.add_argument(
        "--corpus-size",
        type=int,
        default=d.corpus_size,
        help=f"exchanges in the corpus (default {d.corpus_size})",
    )
    build.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    build.add_argument(
        "--threads", type=int, default=d.num_threads, help=f"torch CPU threads (default {d.num_threads})"
    )
    build.add_argument(
        "--save-dtype",
        default=d.save_dtype,
        choices=("float32", "float16", "bfloat16"),
        help=f"dtype of the stored weights (default {d.save_dtype})",
    )
    build.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"windows per step (default {d.batch_size})"
    )
    build.add_argument(
        "--seq-len", type=int, default=d.seq_len, help=f"tokens per window (default {d.seq_len})"
    )
    build.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help=f"warm-up steps (default {d.warmup_steps})"
    )
    build.add_argument(
        "--tokenizer",
        default=d.tokenizer,
        choices=("byte", "bpe"),
        help=f"byte tokens, or a byte-level BPE trained on the corpus (default {d.tokenizer})",
    )
    build.add_argument(
        "--vocab-size", type=int, default=d.vocab_size, help=f"BPE vocabulary size (default {d.vocab_size})"
    )
    build.add_argument(
        "--loss-on",
        default=d.loss_on,
        choices=("all", "answers"),
        help=f"train on every token or on the answers only (default {d.loss_on})",
    )
    build.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="continue training this checkpoint folder (same preset) instead of a fresh model",
    )
    build.add_argument("--force", action="store_true", help="replace an existing checkpoint folder at --out")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=run_demo_build)


def _register_eval(subparsers: Any) -> None:
    """``palm-rlhf demo-reward-build`` and ``palm-rlhf demo-eval``."""
    rbuild = subparsers.add_parser(
        "demo-reward-build",
        help="train the demo reward model on preference pairs of the demo corpus",
        description=(
            "Train a reward model (five rating bins) on the demo policy's trunk with preference pairs "
            "the corpus makes: each answer over an off-topic, misspelled, truncated or repeated one. "
            "The defaults are the recipe of the shipped reward model."
        ),
    )
    rbuild.add_argument("--out", required=True, help="checkpoint folder to create")
    rbuild.add_argument("--policy", help="policy checkpoint whose trunk to train (default: the demo model)")
    rbuild.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's, 1000)")
    rbuild.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    rbuild.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    rbuild.add_argument("--force", action="store_true", help="replace an existing checkpoint folder at --out")
    rbuild.add_argument("--no-progress", action="store_true", help="no progress bar")
    rbuild.set_defaults(func=run_demo_reward_build)

    ev = subparsers.add_parser(
        "demo-eval",
        help="how often the demo model's answers follow the question, alone and best of n",
        description=(
            "Sample answers to held-out questions as the chat page does (temperature 0.8) and print "
            "the share on the question's topic, in corpus words, ended by the model, and broken, for "
            "one sample and for the best of n ranked by the reward model, for the question alone and asked "
            "after earlier exchanges of a conversation. Runs in-process."
        ),
    )
    ev.add_argument("--checkpoint", help="policy checkpoint folder (default: the demo model)")
    ev.add_argument("--reward", help="reward checkpoint folder (default: the shipped demo reward model)")
    ev.add_argument("--questions", type=int, default=200, help="held-out questions (default 200)")
    ev.add_argument("--best-of", type=int, default=4, help="candidates ranked by the reward model (default 4)")
    ev.add_argument("--seed", type=int, default=0, help="question and sampling seed (default 0)")
    ev.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8, the page's)")
    ev.add_argument("--earlier-turns", type=int, default=11,
                    help="earlier exchanges before each question in the conversation figures (default 11: the "
                         "twelfth question of a chat; 0: skip)")
    ev.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ev.add_argument("--json", action="store_true", help="print the figures as JSON")
    ev.set_defaults(func=run_demo_eval)


def _register_users(subparsers: Any) -> None:
    """``palm-rlhf demo-users``."""
    users = subparsers.add_parser(
        "demo-users",
        help="simulated people with a hidden taste chat with a running system and rate its answers",
        description="Raters with a taste the system is never told (default 'when': they like answers that say "
        "when) chat through the gateway with several candidates, click thumbs and 'this one is better', and the "
        "share of served answers they like is measured on questions they never asked, for every policy version "
        "the gateway serves. Start the system first (bash scripts/up.sh).",
    )
    from pathlib import Path

    from services.common.config import flag

    flag(users, "--url", dest="gateway_url", default="http://127.0.0.1:8000",
         help="gateway URL (PALM_RLHF_GATEWAY_URL); default: the gateway of the 'palm-rlhf up' running on "
              "--data-dir, else http://127.0.0.1:8000")
    flag(users, "--data-dir", type=Path, default=Path("./data"),
         help="data directory of a running 'palm-rlhf up', whose DATA_DIR/addresses.json gives the gateway "
              "URL when none is set (PALM_RLHF_DATA_DIR, default ./data)")
    flag(users, "--api-key", default=None, help="API key, when the gateway requires one (PALM_RLHF_API_KEY)")
    users.add_argument("--taste", default="when", choices=("when", "calm"), help="what the raters like")
    users.add_argument("--minutes", type=float, default=25.0, help="how long they chat (default 25)")
    users.add_argument("--raters", type=int, default=4, help="simulated people chatting at once (default 4)")
    users.add_argument("--measure-prompts", type=int, default=48, help="questions only the measurement asks")
    users.add_argument("--measure-samples", type=int, default=2, help="seeded answers per measuring question")
    users.add_argument("--seed", type=int, default=0)
    users.add_argument("--out", help="write every measurement as JSON here")
    users.set_defaults(func=run_demo_users)


def run_demo_users(args: Any) -> int:
    from pathlib import Path

    from palm_rlhf.demo.taste import run_raters, save_result
    from services.common.settings import ClientSettings, build_settings

    settings = build_settings(ClientSettings, args)
    print(f"raters chat with {settings.gateway_url}{settings.where('gateway_url')}", flush=True)
    result = run_raters(settings.gateway_url, api_key=settings.api_key, taste=args.taste, minutes=args.minutes, raters=args.raters,
                        measure_prompts=args.measure_prompts, measure_samples=args.measure_samples, seed=args.seed)
    if args.out:
        save_result(result, Path(args.out))
    first, last = result.measurements[0], result.measurements[-1]
    print(f"feedback sent: {result.feedback}")
    print(f"raters like {first.score:.0%} of answers served by {first.policy_version} and {last.score:.0%} of those "
          f"served by {last.policy_version}")
    return 0


# --- chat ----------------------------------------------------------------------------------


def _pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but no CUDA device is available")
    return name


def load_chat_model(checkpoint: str | None, device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, manifest) of a checkpoint folder, or of the demo model when None.

    Weights are upcast to float32 on CPU (the demo weights are stored in bfloat16)."""
    import torch

    from palm_rlhf.checkpoint import load_palm
    from palm_rlhf.demo import demo_checkpoint_dir
    from palm_rlhf.tokenizer import load_tokenizer

    path = checkpoint or demo_checkpoint_dir()
    dtype = torch.float32 if device == "cpu" else None
    model, manifest = load_palm(path, device=device, dtype=dtype)
    return model, load_tokenizer(manifest.get("tokenizer")), manifest


class ChatSession:
    """A conversation with one model: keeps the turns and builds each prompt from the last
    few, dropping the oldest exchanges when the prompt would not fit the context window."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        temperature: float = 0.8,
        top_p: float = 0.9,
        top_k: int = 0,
        max_new_tokens: int = 160,
        seed: int | None = None,
        history_turns: int = DEFAULT_HISTORY_TURNS,
    ):
        from palm_rlhf.generation import SamplingParams

        self.model, self.tokenizer = model, tokenizer
        self.history: list[dict[str, str]] = []
        self.history_turns = max(0, history_turns)
        stops = [tokenizer.eos_id]
        newline = tokenizer.encode("\n")
        if len(newline) == 1:
            stops.append(newline[0])  # an answer is one line: a newline would start a new turn
        self.params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop_token_ids=tuple(stops),
            seed=seed,
        )
        self.params.validate(model.num_tokens)
        self._turn = 0

    def prompt_ids(self, message: str) -> list[int]:
        from palm_rlhf.chat import encode_prompt, format_chat
        from palm_rlhf.generation import GenerationError

        budget = self.model.config.max_seq_len - self.params.max_new_tokens
        keep = self.history[len(self.history) - 2 * self.history_turns :] if self.history_turns else []
        while True:
            ids = encode_prompt(self.tokenizer, format_chat([*keep, {"role": "user", "content": message}]))
            if len(ids) <= budget:
                return ids
            if not keep:
                raise GenerationError(
                    f"the message is too long: {len(ids)} prompt tokens + {self.params.max_new_tokens} new "
                    f"tokens exceed the model's context of {self.model.config.max_seq_len}"
                )
            keep = keep[2:]  # drop the oldest exchange

    def reply(self, message: str) -> str:
        """The model's answer to ``message``; both are added to the conversation."""
        import dataclasses

        from palm_rlhf.chat import clean_response
        from palm_rlhf.generation import generate_tokens

        ids = self.prompt_ids(message)
        params = self.params
        if params.seed is not None:  # a different, still reproducible draw for every turn
            params = dataclasses.replace(params, seed=params.seed + self._turn)
        self._turn += 1
        completion = generate_tokens(self.model, [ids], params)[0][0]
        answer = clean_response(self.tokenizer.decode(completion.token_ids))
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        self.history.clear()


def run_chat(args: argparse.Namespace) -> int:
    import torch

    from palm_rlhf.checkpoint import CheckpointError
    from palm_rlhf.generation import GenerationError

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    from services.common.settings import DemoSettings, build_settings

    settings = build_settings(DemoSettings, args)
    args.checkpoint, args.device = settings.checkpoint, settings.device
    device = _pick_device(args.device)
    try:
        model, tokenizer, manifest = load_chat_model(args.checkpoint, device)
        if args.int8:
            model.quantize_int8()
        session = ChatSession(
            model,
            tokenizer,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            history_turns=args.history_turns,
        )
    except (CheckpointError, FileNotFoundError, GenerationError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.once is not None:
        try:
            print(session.reply(args.once), flush=True)
        except GenerationError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    interactive = sys.stdin.isatty()
    if interactive:
        name = manifest.get("version") or "model"
        print(
            f"Chatting with {name} ({manifest['kind']}). /reset forgets the conversation; Ctrl-D quits.",
            file=sys.stderr,
        )
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            message = line.strip()
            if not message:
                continue
            if message in ("/quit", "/exit"):
                break
            if message == "/reset":
                session.reset()
                print("(conversation cleared)", file=sys.stderr)
                continue
            try:
                answer = session.reply(message)
            except GenerationError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            print(f"assistant> {answer}" if interactive else answer, flush=True)
    except KeyboardInterrupt:
        pass
    if interactive:
        print(file=sys.stderr)
    return 0


# --- demo-build ----------------------------------------------------------------------------


def run_demo_build(args: argparse.Namespace) -> int:
    import shlex

    from palm_rlhf.checkpoint import CheckpointError
    from palm_rlhf.demo.train import DemoTrainConfig, build_demo_checkpoint

    cfg = DemoTrainConfig(
        seed=args.seed,
        steps=args.steps,
        corpus_size=args.corpus_size,
        lr=args.lr,
        num_threads=args.threads,
        save_dtype=args.save_dtype,
        init_from=args.init_from,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup_steps=args.warmup_steps,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        loss_on=args.loss_on,
    )
    command = (
        f"palm-rlhf demo-build --out {shlex.quote(str(args.out))} --steps {args.steps} --seed {args.seed} "
        f"--corpus-size {args.corpus_size} --lr {args.lr} --threads {args.threads} --save-dtype {args.save_dtype} "
        f"--batch-size {args.batch_size} --seq-len {args.seq_len} --warmup-steps {args.warmup_steps} "
        f"--tokenizer {args.tokenizer} --vocab-size {args.vocab_size} --loss-on {args.loss_on}"
    )
    if args.init_from:
        command += f" --init-from {shlex.quote(str(args.init_from))}"
    try:
        out = build_demo_checkpoint(
            args.out, cfg, force=args.force, progress=not args.no_progress, command=command
        )
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


# --- demo-reward-build and demo-eval -----------------------------------------------------


def run_demo_reward_build(args: argparse.Namespace) -> int:
    import shlex

    from palm_rlhf.checkpoint import CheckpointError
    from palm_rlhf.demo import demo_checkpoint_dir
    from palm_rlhf.demo.reward_train import RewardTrainConfig, build_reward_checkpoint

    policy = args.policy or str(demo_checkpoint_dir())
    cfg = RewardTrainConfig(seed=args.seed, num_threads=args.threads)
    if args.steps is not None:
        cfg.steps = args.steps
    command = (
        f"palm-rlhf demo-reward-build --out {shlex.quote(str(args.out))} --policy {shlex.quote(str(policy))} "
        f"--steps {cfg.steps} --seed {args.seed} --threads {args.threads}"
    )
    try:
        out = build_reward_checkpoint(
            args.out, policy, cfg, force=args.force, progress=not args.no_progress, command=command
        )
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def run_demo_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    from palm_rlhf.checkpoint import load_palm
    from palm_rlhf.demo import demo_checkpoint_dir, demo_reward_dir
    from palm_rlhf.demo.evaluate import demo_eval
    from palm_rlhf.demo.reward_train import load_reward_checkpoint
    from palm_rlhf.tokenizer import load_tokenizer

    torch.set_num_threads(max(1, args.threads))
    model, manifest = load_palm(args.checkpoint or demo_checkpoint_dir(), dtype=torch.float32)
    tok = load_tokenizer(manifest.get("tokenizer"))
    reward_path = args.reward or demo_reward_dir()
    reward = load_reward_checkpoint(reward_path)[0] if reward_path else None
    result = demo_eval(model.eval(), tok, reward, count=args.questions, seed=args.seed, best_of=args.best_of,
                       temperature=args.temperature, earlier_turns=args.earlier_turns)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['questions']} held-out questions at temperature {result['temperature']}; topic classifier "
          f"accuracy on corpus answers {result['classifier_accuracy']:.1%}")
    _print_figures("the question alone", result)
    if "conversation" in result:
        _print_figures(f"after {result['conversation']['earlier_turns']} earlier exchanges", result["conversation"])
    return 0


def _print_figures(title: str, result: dict) -> None:
    print(f"{title:24} {'topic match':>12} {'corpus words':>13} {'ended':>7} {'broken':>7}")
    for key in [k for k in result if k == "n1" or k.startswith("best_of_")]:
        f = result[key]
        label = "  n=1" if key == "n1" else "  " + key.replace("best_of_", "best of ")
        print(f"{label:24} {f['topic_match']:>12.1%} {f['corpus_words']:>13.1%} {f['ended']:>7.1%} {f['broken']:>7.1%}")
