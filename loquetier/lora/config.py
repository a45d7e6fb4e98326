"""The configuration of one LoRA adapter (what PEFT calls a ``LoraConfig``, cut to what we run)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .pool import TARGET_MODULES

# An adapter's output is scale * x @ A.T @ B.T: a larger scale or weight only serves garbage (a
# lora_alpha of 1e30 turns every logit into inf and the model answers token 0 forever).
MAX_LORA_SCALE = 1000.0
MAX_RANK = 2**31 - 1  # an int32; past it a rank is a hostile value (the engine's own max_lora_rank is far lower)
MAX_ABS_WEIGHT = 1e4


class AdapterError(ValueError):
    """An adapter (config, weights, files or id) that Loquetier cannot use, with the reason."""


class AdapterCapacityError(AdapterError):
    """The adapter is fine but does not fit now: the CPU budget is held by adapters in use.
    The same request may succeed later (wire code ``no_slot``)."""


@dataclass(frozen=True)
class LoRAConfig:
    """rank ``r``, ``alpha``, ``dropout``, the targeted linears and the rsLoRA flag.

    ``scale`` is what the kernels multiply ``x @ A.T @ B.T`` by: ``alpha / r``, or
    ``alpha / sqrt(r)`` with rsLoRA. ``layers`` None targets every layer (PEFT's
    ``layers_to_transform``, kept for round-trips).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_rslora: bool = False
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience; order is normalised so equal configs compare equal.
        modules = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        unknown = sorted(set(modules) - set(TARGET_MODULES))
        if unknown:
            raise AdapterError(f"unknown LoRA target modules {unknown}; supported: {list(TARGET_MODULES)}")
        if not modules:
            raise AdapterError("target_modules must name at least one module")
        object.__setattr__(self, "target_modules", tuple(m for m in TARGET_MODULES if m in set(modules)))
        if not _is_int(self.rank) or not 1 <= self.rank <= MAX_RANK:
            raise AdapterError(f"rank must be an integer in [1, {MAX_RANK}], got {self.rank!r:.40}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            raise AdapterError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not self.scale <= MAX_LORA_SCALE:
            raise AdapterError(f"lora_alpha {self.alpha!r} with r={self.rank} gives a scale of {self.scale:.4g}, "
                               f"more than {MAX_LORA_SCALE:g}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if self.layers is not None:
            layers = tuple(sorted(set(self.layers)))
            if not layers or layers[0] < 0:
                raise AdapterError(f"layers must be non-empty and >= 0, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def targets_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, object]:
        """``adapter_config.json`` content that HF PEFT (and vLLM) read as this adapter."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "layers_to_transform": None if self.layers is None else list(self.layers),
            "layers_pattern": None,
            "layer_replication": None,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
            "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, cfg: dict[str, object]) -> LoRAConfig:
        """Parse ``adapter_config.json``; unsupported PEFT options raise :class:`AdapterError`."""
        peft_type = cfg.get("peft_type")
        if peft_type != "LORA":
            raise AdapterError(f"peft_type {peft_type!r} is not supported; only LORA adapters are")
        unsupported = {
            "use_dora": bool,
            "layer_replication": lambda v: v is not None,
            "modules_to_save": bool,
            "rank_pattern": bool,
            "alpha_pattern": bool,
            "fan_in_fan_out": bool,
            "lora_bias": bool,
            "bias": lambda v: v not in (None, "none"),
            "use_qalora": bool,
            "target_parameters": bool,
            "trainable_token_indices": bool,
            "exclude_modules": bool,
            "layers_pattern": lambda v: bool(v) and v not in ("layers", ["layers"]),
            "alora_invocation_tokens": bool,
        }
        for key, is_set in unsupported.items():
            if key in cfg and is_set(cfg[key]):
                raise AdapterError(f"adapter_config.json: {key}={cfg[key]!r} is not supported")
        targets = cfg.get("target_modules")
        if targets == "all-linear":
            targets = list(TARGET_MODULES)
        elif isinstance(targets, str):
            raise AdapterError(f"target_modules as a pattern ({targets!r}) is not supported; list them")
        if not isinstance(targets, list | tuple):
            raise AdapterError(f"target_modules must be a list, got {targets!r}")
        layers = cfg.get("layers_to_transform")
        if _is_int(layers):
            layers = [layers]
        if layers is not None and not (isinstance(layers, list | tuple) and all(_is_int(x) for x in layers)):
            raise AdapterError(f"layers_to_transform must be a layer index or a list of them, got {layers!r:.80}")
        rank, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)
        if not _is_int(rank) or not (_is_int(alpha) or isinstance(alpha, float)):
            raise AdapterError(f"r and lora_alpha must be numbers, got {rank!r:.40} and {alpha!r:.40}")
        assert isinstance(rank, int) and isinstance(alpha, int | float)
        if rank > MAX_RANK or (isinstance(alpha, int) and abs(alpha) > 2**53):
            raise AdapterError(f"r must be at most {MAX_RANK} and lora_alpha a float's range, got r={rank!r:.40}, "
                               f"lora_alpha={alpha!r:.40}")
        use_rslora = cfg.get("use_rslora", False)
        if not isinstance(use_rslora, bool | None):  # "no" must not read as true
            raise AdapterError(f"use_rslora must be true or false, got {use_rslora!r:.40}")
        dropout = cfg.get("lora_dropout", 0.0)
        return cls(
            rank=rank,
            alpha=float(alpha),
            dropout=float(dropout) if isinstance(dropout, int | float) and not isinstance(dropout, bool) else -1.0,
            target_modules=tuple(str(t) for t in targets),
            use_rslora=bool(use_rslora),
            layers=None if layers is None else tuple(layers),
        )


def _is_int(value: object) -> bool:
    """An int that is not a bool (JSON's true is not a rank)."""
    return isinstance(value, int) and not isinstance(value, bool)
