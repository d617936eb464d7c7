"""PaLM language models with LoRA, a reward model and RLHF, served as gRPC microservices.

The public names load on first use, so that importing a light submodule (the generated
gRPC contracts in ``palm_rlhf.proto``, say) does not pull in torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PRESETS": "palm_rlhf.config",
    "PaLMConfig": "palm_rlhf.config",
    "Completion": "palm_rlhf.generation",
    "DecodeSession": "palm_rlhf.generation",
    "GenerationError": "palm_rlhf.generation",
    "SamplingParams": "palm_rlhf.generation",
    "generate_tokens": "palm_rlhf.generation",
    "stream_generate": "palm_rlhf.generation",
    "PaLM": "palm_rlhf.model",
    "top_k": "palm_rlhf.model",
    "top_p": "palm_rlhf.model",
    "RewardModel": "palm_rlhf.reward",
    "RLHFTrainer": "palm_rlhf.rl.trainer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'palm_rlhf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
