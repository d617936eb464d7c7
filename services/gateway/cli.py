"""``palm-rlhf feedback-export``: the feedback log as JSON lines, straight from the database
(no gateway needs to be running)."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "feedback-export",
        help="write the feedback log (completions, candidates, feedback) as JSON lines",
        description="Export the gateway's feedback log: one JSON object per stored completion, "
        "with every candidate (tokens, log-probs, reward) and all feedback on it.",
    )
    p.add_argument(
        "--database-url",
        default=None,
        help="sqlite:///path.db or postgresql://... (env PALM_RLHF_DATABASE_URL; "
        "default sqlite:///DATA_DIR/feedback.db)",
    )
    p.add_argument("--data-dir", default=None, help="data directory (env PALM_RLHF_DATA_DIR, default ./data)")
    p.add_argument("--out", default="-", help="output file (default: standard output)")
    p.add_argument("--after-seq", type=int, default=0, help="only completions after this sequence number")
    p.add_argument(
        "--with-feedback-only", action="store_true", help="skip completions nobody gave feedback on"
    )
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.common.feedback_store import open_store

    from .settings import GatewaySettings

    settings = GatewaySettings.from_args(args)
    url = settings.resolved_database_url()
    if not settings.database_url and not (settings.data_dir / "feedback.db").exists():
        print(f"error: no feedback database at {settings.data_dir / 'feedback.db'}", file=sys.stderr)
        return 1
    with open_store(url) as store:
        if args.out == "-":
            n = store.export_jsonl(
                sys.stdout, after_seq=args.after_seq, with_feedback_only=args.with_feedback_only
            )
        else:
            tmp = Path(args.out + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                n = store.export_jsonl(
                    f, after_seq=args.after_seq, with_feedback_only=args.with_feedback_only
                )
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(args.out)  # a reader never sees a half-written export
    print(f"exported {n} completion(s)", file=sys.stderr)
    return 0
