"""One LoRA adapter: config + weights, in and out of the PEFT directory format.

Weights use PEFT's layout: ``weights[(layer, module)] = (A [r, in], B [out, r])`` and the delta
of a targeted linear is ``scale * x @ A.T @ B.T``. On disk (``adapter_model.safetensors``) the keys
are PEFT's, e.g. ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``.
"""

from __future__ import annotations

import json
import math
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import tensor_io
from .config import MAX_ABS_WEIGHT, AdapterError, LoRAConfig
from .pool import ModelDims

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_ID_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

Weights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def peft_key(layer: int, module: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}.lora_{which}.weight"


def resolve_adapter_dir(root: str | Path, adapter_id: str) -> Path:
    """The directory of ``adapter_id`` under ``root``; ids that could escape ``root`` are refused.

    An id is one or more ``/``-separated parts of ``[A-Za-z0-9_.-]`` not starting with ``.`` or ``-``
    (so no ``..``, absolute paths, backslashes or hidden files); symlinks leaving ``root`` are refused too.
    """
    parts = adapter_id.split("/")
    if len(adapter_id) > 256 or not all(_ID_PART.match(p) for p in parts):
        raise AdapterError(f"adapter id {adapter_id!r} is not a safe relative name (allowed: [A-Za-z0-9_.-] "
                           "parts separated by '/', not starting with '.' or '-')")
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if not path.is_relative_to(base):
        raise AdapterError(f"adapter id {adapter_id!r} resolves outside the adapter directory {base}")
    return path


@dataclass
class LoRAAdapter:
    config: LoRAConfig
    weights: Weights
    base_model_name_or_path: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # free-form provenance, kept in to_bytes()

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def scale(self) -> float:
        return self.config.scale

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.weights.values() for t in pair)

    @staticmethod
    def estimate_bytes(config: LoRAConfig, dims: ModelDims, element_size: int = 4) -> int:
        """The bytes of an adapter with ``config`` on a model of ``dims``, known before allocating it."""
        targeted = sum(1 for layer in range(dims.num_layers) if config.targets_layer(layer))
        per_layer = sum(sum(dims.module_shape(m)) for m in config.target_modules)
        return targeted * per_layer * config.rank * element_size

    @classmethod
    def new(cls, config: LoRAConfig, dims: ModelDims, *, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> LoRAAdapter:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)), B = 0; A drawn from ``seed`` in
        (layer, module) order, so the same seed gives the same adapter."""
        gen = torch.Generator().manual_seed(seed)
        weights: Weights = {}
        for layer in range(dims.num_layers):
            if not config.targets_layer(layer):
                continue
            for module in config.target_modules:
                fan_in, fan_out = dims.module_shape(module)
                a = torch.empty(config.rank, fan_in)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
                weights[(layer, module)] = (a.to(dtype), torch.zeros(fan_out, config.rank, dtype=dtype))
        return cls(config, weights)

    def clone(self) -> LoRAAdapter:
        weights = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in self.weights.items()}
        return LoRAAdapter(self.config, weights, self.base_model_name_or_path, dict(self.extra))

    def validate(self, dims: ModelDims | None = None) -> None:
        """Every weight fits the config (rank, modules, layers) and, given ``dims``, the base model."""
        cfg = self.config
        if not self.weights:
            raise AdapterError("adapter has no LoRA weights")
        for (layer, module), (a, b) in self.weights.items():
            where = f"layer {layer} {module}"
            if module not in cfg.target_modules:
                raise AdapterError(f"{where}: weights for a module not in target_modules "
                                   f"{list(cfg.target_modules)}")
            if not cfg.targets_layer(layer):
                raise AdapterError(f"{where}: weights for a layer outside layers_to_transform")
            if a.dim() != 2 or b.dim() != 2:
                raise AdapterError(f"{where}: A and B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
            if a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
                raise AdapterError(f"{where}: weights have rank {a.shape[0]}/{b.shape[1]} (A rows/B columns) "
                                   f"but the config says r={cfg.rank}")
            if not (a.is_floating_point() and b.is_floating_point()):
                raise AdapterError(f"{where}: weights must be floating point, got {a.dtype} and {b.dtype}")
            for name, t in (("A", a), ("B", b)):
                if t.numel() and not bool(t.detach().abs().max() <= MAX_ABS_WEIGHT):  # False for NaN as well
                    raise AdapterError(f"{where}: {name} holds a non-finite weight or one above "
                                       f"{MAX_ABS_WEIGHT:g} in absolute value")
            if dims is None:
                continue
            if layer >= dims.num_layers:
                raise AdapterError(f"{where}: the base model has only {dims.num_layers} layers")
            fan_in, fan_out = dims.module_shape(module)
            if a.shape[1] != fan_in or b.shape[0] != fan_out:
                raise AdapterError(f"{where}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the base "
                                   f"model (expected A [{cfg.rank}, {fan_in}], B [{fan_out}, {cfg.rank}])")
        if dims is not None:
            for layer in range(dims.num_layers):
                if not cfg.targets_layer(layer):
                    continue
                missing = [m for m in cfg.target_modules if (layer, m) not in self.weights]
                if missing:
                    raise AdapterError(f"layer {layer}: missing weights for target modules {missing}")

    # --- PEFT directory format -------------------------------------------------------------

    @classmethod
    def load(cls, peft_dir: str | Path, dims: ModelDims | None = None, max_rank: int | None = None) -> LoRAAdapter:
        """Read a PEFT LoRA directory; validated against ``dims`` when given. A rank above ``max_rank``
        is refused from the config, before any weight is read."""
        path = Path(peft_dir)
        cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not path.is_dir():
            raise AdapterError(f"adapter directory {path} does not exist")
        for p in (cfg_path, weights_path):
            if not p.is_file():
                hint = " (adapter_model.bin / pickle is not supported)" if p is weights_path else ""
                raise AdapterError(f"missing {p.name} in {path}{hint}")
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or not UTF-8
            what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
            raise AdapterError(f"{cfg_path}: unreadable JSON: {what}") from exc
        if not isinstance(raw, dict):
            raise AdapterError(f"{cfg_path}: expected a JSON object")
        config = LoRAConfig.from_peft_dict(raw)
        check_rank(config, max_rank)
        try:
            tensors = load_file(weights_path)
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"{weights_path}: unreadable safetensors file: {exc}") from exc
        base = raw.get("base_model_name_or_path")
        adapter = cls(config, _weights_from_peft(tensors), base if isinstance(base, str) else None)
        adapter.validate(dims)
        return adapter

    def save(self, peft_dir: str | Path) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable by HF PEFT and vLLM)."""
        self.validate()
        path = Path(peft_dir)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config.to_peft_dict(self.base_model_name_or_path)
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(self._peft_tensors(), path / WEIGHTS_FILE, metadata={"format": "pt"})
        # safetensors creates its file mode 600: give it the mode the umask gave the config file
        (path / WEIGHTS_FILE).chmod(stat.S_IMODE((path / CONFIG_FILE).stat().st_mode))

    def _peft_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for (layer, module), (a, b) in sorted(self.weights.items()):
            out[peft_key(layer, module, "A")] = a.detach().to("cpu").contiguous()
            out[peft_key(layer, module, "B")] = b.detach().to("cpu").contiguous()
        return out

    # --- bytes (for Postgres) ----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        header = {"kind": "adapter", "config": self.config.to_peft_dict(self.base_model_name_or_path),
                  "extra": self.extra}
        return tensor_io.pack(self._peft_tensors(), header)

    @classmethod
    def from_bytes(cls, data: bytes, dims: ModelDims | None = None, max_rank: int | None = None) -> LoRAAdapter:
        header = tensor_io.header(data)
        if header.get("kind") != "adapter" or not isinstance(header.get("config"), dict):
            raise AdapterError(f"blob holds a {header.get('kind')!r}, not an adapter")
        raw = header["config"]
        config = LoRAConfig.from_peft_dict(raw)
        check_rank(config, max_rank)
        tensors, _ = tensor_io.unpack(data)
        adapter = cls(config, _weights_from_peft(tensors),
                      raw.get("base_model_name_or_path"), dict(header.get("extra") or {}))
        adapter.validate(dims)
        return adapter


def check_rank(config: LoRAConfig, max_rank: int | None) -> None:
    """Refuse a rank above ``max_rank`` from the config alone (before its weights take memory)."""
    if max_rank is not None and config.rank > max_rank:
        raise AdapterError(f"rank {config.rank} is above this engine's max_lora_rank {max_rank}")


def _weights_from_peft(tensors: dict[str, torch.Tensor]) -> Weights:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None or _PARENT.get(m.group(3)) != m.group(2):
            raise AdapterError(f"unsupported tensor {key!r} in the adapter (only Llama-family "
                               f"attention/MLP lora_A/lora_B weights are supported)")
        halves.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = tensor
    weights: Weights = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module}: lora_A and lora_B must both be present")
        weights[(layer, module)] = (pair["A"], pair["B"])
    return weights
