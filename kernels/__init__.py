"""SMLM: Segmented Multi-LoRA Multiplication (Triton kernels + torch references).

Model code imports only the op layer: ``lora_linear``, ``SMLMMeta``, ``ModuleLoRA``.
"""

from .meta import SMLMMeta
from .ops import (
    backend_for,
    deterministic_enabled,
    force_backend,
    fused_decode_enabled,
    lora_linear,
    lora_overlap,
    overlap_scope,
    set_deterministic,
    set_fused_decode,
    set_lora_overlap,
    variant_metas,
    warm_lora_linear,
)
from .weights import ModuleLoRA

__all__ = ["ModuleLoRA", "SMLMMeta", "backend_for", "deterministic_enabled", "force_backend", "fused_decode_enabled",
           "lora_linear", "lora_overlap", "overlap_scope", "set_deterministic", "set_fused_decode",
           "set_lora_overlap", "variant_metas", "warm_lora_linear"]
