"""Our own Llama-family decoder over one packed mixed batch (transformers is only the oracle).

Public API: ``ModelConfig``, ``LlamaModel`` (+ ``ForwardOutput``), ``BatchBuilder`` / ``ForwardBatch``,
``chunked_cross_entropy`` / ``weighted_loss``, ``KVCache`` (the paged KV storage). Its block
allocator lives in ``loquetier.engine.kv_cache``; the sampler in ``loquetier.engine.sampler``.
"""

from .batch import IGNORE_INDEX, BatchBuilder, ForwardBatch, PagedMeta, VarlenMeta
from .config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from .kv_cache import KVCache
from .llama import ForwardOutput, LlamaModel
from .loader import CheckpointError, load_config, load_state_dict
from .loss import chunked_cross_entropy, weighted_loss

__all__ = [
    "IGNORE_INDEX",
    "SUPPORTED_ARCHITECTURES",
    "BatchBuilder",
    "CheckpointError",
    "ForwardBatch",
    "ForwardOutput",
    "KVCache",
    "LlamaModel",
    "ModelConfig",
    "PagedMeta",
    "UnsupportedModelError",
    "VarlenMeta",
    "chunked_cross_entropy",
    "load_config",
    "load_state_dict",
    "weighted_loss",
]
