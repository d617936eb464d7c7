"""Conversions between the served models and the shared contract messages."""

from __future__ import annotations

import json
from typing import Any

from palm_rlhf.proto.v1 import common_pb2
from services.common.models import LoadedPalm, num_parameters


def tokenizer_info(tok) -> common_pb2.TokenizerInfo:
    spec = tok.to_dict() if hasattr(tok, "to_dict") else {"kind": getattr(tok, "kind", "unknown")}
    return common_pb2.TokenizerInfo(
        kind=str(getattr(tok, "kind", spec.get("kind", ""))),
        vocab_size=int(tok.vocab_size),
        pad_id=int(tok.pad_id),
        bos_id=int(tok.bos_id),
        eos_id=int(tok.eos_id),
        sep_id=int(getattr(tok, "sep_id", -1) if getattr(tok, "sep_id", None) is not None else -1),
        spec_json=json.dumps(spec),
    )


def model_info(kind: str, loaded: LoadedPalm, *, store=None, device: str = "cpu", extra_config: dict[str, Any] | None = None,
               module=None, **fields: Any) -> common_pb2.ModelInfoResponse:
    """A ModelInfoResponse for ``loaded``; ``fields`` fill the limit and scorer fields."""
    config = dict(loaded.manifest.get("config", {}))
    if extra_config:
        config.update(extra_config)
    return common_pb2.ModelInfoResponse(
        kind=kind,
        version=loaded.version,
        config_json=json.dumps(config, sort_keys=True),
        tokenizer=tokenizer_info(loaded.tokenizer),
        max_seq_len=int(loaded.config.max_seq_len),
        num_parameters=num_parameters(module if module is not None else loaded.model),
        parent_version=str(loaded.manifest.get("parent") or ""),
        available_versions=store.versions() if store is not None else [],
        device=device,
        checkpoint_path=str(loaded.path),
        **fields,
    )
