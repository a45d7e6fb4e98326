"""Loquetier: fine-tune and serve many LoRA adapters on one shared base LLM, in one process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Engine", "EngineError", "GenerationOutput", "SamplingParams", "TrainingParams", "__version__"]

if TYPE_CHECKING:
    from loquetier.engine.engine import Engine
    from loquetier.engine.errors import EngineError
    from loquetier.engine.requests import GenerationOutput
    from loquetier.engine.sequence import SamplingParams
    from loquetier.lora.params import TrainingParams

_LAZY = {
    "Engine": "loquetier.engine.engine",
    "EngineError": "loquetier.engine.errors",
    "GenerationOutput": "loquetier.engine.requests",
    "SamplingParams": "loquetier.engine.sequence",
    "TrainingParams": "loquetier.lora.params",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import loquetier.messages` on the service side does not pay for torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loquetier' has no attribute {name!r}")
