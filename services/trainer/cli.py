"""``palm-rlhf trainer status|trigger|rollback`` and ``palm-rlhf demo-loop``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.common.config import DEFAULT_ADDRS, flag


def _trainer_args(p: argparse.ArgumentParser) -> None:
    flag(p, "--trainer-addr", default=DEFAULT_ADDRS["trainer"],
         help="trainer service address (PALM_RLHF_TRAINER_ADDR); default: the trainer of the 'palm-rlhf up' "
              f"running on --data-dir (its DATA_DIR/addresses.json), else {DEFAULT_ADDRS['trainer']}")
    flag(p, "--admin-token", default=None,
         help="bearer token for the admin RPCs Trigger and Rollback; prefer PALM_RLHF_ADMIN_TOKEN or "
              "--admin-token-file (a flag is visible in the process list). Default: DATA_DIR/admin-token "
              "as written by 'palm-rlhf up'")
    flag(p, "--admin-token-file", type=Path, default=None,
         help="read the admin token from this file (PALM_RLHF_ADMIN_TOKEN_FILE)")
    flag(p, "--data-dir", type=Path, default=Path("./data"),
         help="where 'palm-rlhf up' keeps its admin-token and addresses.json files (PALM_RLHF_DATA_DIR, "
              "default ./data)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the reply (default 3600)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")


def _print(reply, as_json: bool) -> None:
    from google.protobuf.json_format import MessageToDict

    d = MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if as_json:
        print(json.dumps(d, indent=1, sort_keys=True))
        return
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in sorted(v.items()):
                print(f"  {kk}: {vv}")
        else:
            print(f"{k}: {v}")


def _run_trainer(args: argparse.Namespace) -> int:
    import grpc

    from palm_rlhf.proto.v1 import trainer_pb2, trainer_pb2_grpc
    from services.common.client import admin_metadata, client_credentials, create_sync_channel
    from services.common.settings import ClientSettings, build_settings

    settings = build_settings(ClientSettings, args)
    md = admin_metadata(settings.admin_token)
    creds = client_credentials(settings.tls_ca, settings.tls_client_cert, settings.tls_client_key)
    try:
        with create_sync_channel(settings.trainer_addr, max_message_bytes=settings.max_message_bytes,
                                 credentials=creds) as ch:
            stub = trainer_pb2_grpc.TrainerStub(ch)
            if args.action == "status":
                reply = stub.Status(trainer_pb2.StatusRequest(), timeout=args.timeout)
            elif args.action == "trigger":
                reply = stub.Trigger(trainer_pb2.TriggerRequest(wait=not args.no_wait), timeout=args.timeout,
                                     metadata=md)
            else:
                reply = stub.Rollback(trainer_pb2.RollbackRequest(version=args.to or ""), timeout=args.timeout,
                                      metadata=md)
    except grpc.RpcError as e:
        print(f"error: {args.action} failed: {e.code().name}: {e.details()} "
              f"[trainer at {settings.trainer_addr}{settings.where('trainer_addr')}]")
        return 1
    _print(reply, args.json)
    return 0


def _run_demo_loop(args: argparse.Namespace) -> int:
    from palm_rlhf.demo.simulate import DemoLoopConfig, run_demo_loop
    from services.common.settings import DemoSettings, build_settings

    demo = build_settings(DemoSettings, args)
    cfg = DemoLoopConfig(
        data_dir=Path(args.data_dir), rounds=args.rounds, users=args.users, chats_per_user=args.chats,
        max_tokens=args.max_tokens, eval_prompts=args.eval_prompts, eval_samples=args.eval_samples,
        reward_scorer=demo.reward_scorer, algorithm=demo.rl_algorithm, seed=args.seed, port=args.port,
        plot=not args.no_plot, start_checkpoint=Path(args.checkpoint) if args.checkpoint else None,
    )
    result = run_demo_loop(cfg)
    if len(result.versions) < 2:
        print("no policy version was published: nothing to compare")
        return 1
    print(f"mean sentiment {result.first.mean_sentiment:+.3f} -> {result.last.mean_sentiment:+.3f}, "
          f"KL to the reference {result.first.kl:.3f} -> {result.last.kl:.3f}")
    return 0


def register(subparsers) -> None:
    t = subparsers.add_parser("trainer", help="observe and control the trainer service (status, trigger, rollback)",
                              description="Talk to a running trainer service over gRPC.")
    tsub = t.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = tsub.add_parser("status", help="step, versions and the last round's metrics")
    _trainer_args(s)
    tr = tsub.add_parser("trigger", help="run one update round now (admin)")
    _trainer_args(tr)
    tr.add_argument("--no-wait", action="store_true", help="start the round and return at once")
    rb = tsub.add_parser("rollback", help="make an earlier policy version current again (admin)")
    _trainer_args(rb)
    rb.add_argument("--to", metavar="VERSION", help="version to roll back to (default: the current one's parent)")
    for p in (s, tr, rb):
        p.set_defaults(func=_run_trainer)

    d = subparsers.add_parser(
        "demo-loop", help="closed-loop demonstration: simulated users teach the policy through the gateway",
        description="Start every service, let simulated users who like cheerful answers chat and leave feedback, "
                    "trigger the trainer, and report the served answers' sentiment and KL per policy version "
                    "(plot in DATA_DIR/demo-loop.png).",
    )
    d.add_argument("--data-dir", required=True, help="state directory for the services (a fresh one is best)")
    d.add_argument("--rounds", type=int, default=3, help="feedback-then-train rounds (default 3)")
    d.add_argument("--users", type=int, default=4, help="simulated users (default 4)")
    d.add_argument("--chats", type=int, default=8, help="chats per user per round (default 8)")
    d.add_argument("--max-tokens", type=int, default=48, help="answer length limit in tokens (default 48)")
    d.add_argument("--eval-prompts", type=int, default=48, help="fixed held-out prompts measured (default 48)")
    d.add_argument("--eval-samples", type=int, default=2, help="seeded samples per measured prompt (default 2)")
    flag(d, "--reward-scorer", default="sentiment",
         help="training reward: learned, sentiment or e.g. 'learned:0.5+sentiment:1' (PALM_RLHF_REWARD_SCORER, "
              "default sentiment)")
    flag(d, "--algorithm", dest="rl_algorithm", default="rloo",
         choices=("ppo", "grpo", "drgrpo", "rloo", "dpo", "ipo", "kto"),
         help="policy update: RL on rewarded rollouts (ppo, grpo, drgrpo, rloo) or preference "
              "optimisation on the logged pairs (dpo, ipo, kto) (PALM_RLHF_RL_ALGORITHM, default rloo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    d.add_argument("--no-plot", action="store_true", help="skip the PNG")
    d.add_argument("--checkpoint", help="policy checkpoint folder to start from (default: the shipped demo model)")
    d.set_defaults(func=_run_demo_loop)
