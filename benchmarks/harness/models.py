"""Random-weight models and adapters for the benchmarks, built where they run (nothing downloaded).

- ``SPECS``: ``8b`` is the Llama-3-8B shape, ``small`` a quick-run shape, ``tiny`` the CPU smoke shape.
- :func:`prepare_base` returns an HF ``LlamaForCausalLM`` with random weights on the device and a
  safetensors directory of the same weights for our engine. The directory is cached (a marker file is
  written last), so the four benchmark scripts of one GPU run write the 16 GB once and then only read.
  The model is built on the meta device, materialized with ``to_empty`` and filled with ``normal_``
  on the device itself (seconds for 8B on a GPU).
- :func:`prepare_adapters` makes PEFT adapters with PEFT itself (``get_peft_model`` / ``add_adapter``
  with ``init_lora_weights=False``: random non-zero A and B) and saves each with ``save_pretrained``;
  an adapter directory that already exists is loaded instead. The PEFT model it returns is the
  baseline's model with every adapter resident.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIXED_RANKS = (8, 16, 64)
MARKER = ".loquetier-bench-complete"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def hf_config_dict(self, dtype: str) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "dtype": dtype,
        }

    def num_params(self) -> int:
        h, i, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
        return n * per_layer + 2 * v * h + h

    def decode_weight_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes one decode step must read: every weight except the (untied) embedding table."""
        return (self.num_params() - self.vocab_size * self.hidden_size) * dtype_bytes

    def lora_bytes(self, rank: int, dtype_bytes: int = 2) -> int:
        """Bytes of one adapter of ``rank`` on all seven targets."""
        h, i = self.hidden_size, self.intermediate_size
        kv = self.num_kv_heads * self.head_dim
        per_layer = rank * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
        return per_layer * self.num_layers * dtype_bytes


SPECS = {
    "8b": ModelSpec("8b", 4096, 32, 32, 8, 14336, 128256, 8192),
    "small": ModelSpec("small", 1024, 8, 16, 8, 3584, 32000, 4096),
    "tiny": ModelSpec("tiny", 64, 2, 4, 2, 128, 512, 1024),
}


def default_dtype(device: str) -> str:
    return "bfloat16" if device.startswith("cuda") else "float32"


def _reset_rotary(model: torch.nn.Module, device: torch.device | str) -> None:
    """Recompute RoPE buffers: they are non-persistent, so ``to_empty`` leaves garbage in them."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            inv_freq, _ = module.compute_default_rope_parameters(module.config, device)
            module.inv_freq = inv_freq.to(device)
            module.original_inv_freq = inv_freq.clone().to(device)


def _empty_hf_model(spec: ModelSpec, device: str, dtype: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec.hf_config_dict(dtype))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=DTYPES[dtype]).to_empty(device=device)
    _reset_rotary(model, device)
    model.eval()
    model.requires_grad_(False)
    return model


def build_random_hf_model(spec: ModelSpec, device: str, dtype: str, seed: int = 0) -> torch.nn.Module:
    """An HF Llama with random weights made on ``device`` (norms = 1, the rest N(0, 0.02))."""
    model = _empty_hf_model(spec, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model


SHARD_BYTES = 4 << 30


def write_model_dir(model: torch.nn.Module, path: Path) -> None:
    """``config.json`` + safetensors shards with an index (the HF layout our loader reads), then the
    marker. Tensors go to the CPU one shard at a time, so host memory stays bounded."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    (path / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1, default=str))
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in shard}
        save_file(cpu, str(path / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in cpu.values())
        weight_map.update(dict.fromkeys(cpu, fname))
        del cpu
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (path / MARKER).write_text(json.dumps({"written": time.time(), "shards": len(shards)}))


def load_hf_model(spec: ModelSpec, path: Path, device: str, dtype: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    model = _empty_hf_model(spec, device, dtype)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(path / fname), device=str(device)))
    model.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in state.items()}, strict=True, assign=True)
    _reset_rotary(model, device)
    model.requires_grad_(False)
    return model


def _dir_matches(path: Path, spec: ModelSpec, dtype: str) -> bool:
    if not (path / MARKER).is_file() or not (path / "model.safetensors.index.json").is_file():
        return False
    raw = json.loads((path / "config.json").read_text())
    want = spec.hf_config_dict(dtype)
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
    )
    return all(raw.get(k) == want[k] for k in keys) and str(raw.get("dtype")).endswith(dtype)


def prepare_base(
    spec: ModelSpec, root: Path, device: str, dtype: str, *, seed: int = 0, log: Any = print
) -> tuple[torch.nn.Module, Path]:
    """(HF model on ``device``, safetensors dir with the same weights), the dir cached under ``root``."""
    path = root / f"llama-{spec.name}-{dtype}"
    t0 = time.perf_counter()
    if _dir_matches(path, spec, dtype):
        model = load_hf_model(spec, path, device, dtype)
        log(f"[models] loaded {spec.name} from {path} in {time.perf_counter() - t0:.1f}s")
    else:
        model = build_random_hf_model(spec, device, dtype, seed)
        _sync(device)
        t1 = time.perf_counter()
        write_model_dir(model, path)
        log(f"[models] built {spec.name} in {t1 - t0:.1f}s, wrote {path} in {time.perf_counter() - t1:.1f}s")
    return model, path


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------
# adapters


def adapter_ranks(num_adapters: int, mixed: bool, rank: int = 16) -> list[int]:
    return [MIXED_RANKS[i % len(MIXED_RANKS)] if mixed else rank for i in range(num_adapters)]


def lora_config(rank: int, *, random_init: bool = True) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        init_lora_weights=not random_init,
        task_type="CAUSAL_LM",
    )


def _randomize_adapter(peft_model: Any, name: str, seed: int) -> None:
    """Random non-zero A and B, scaled so the delta is small next to the base output."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if f".{name}." in pname and (".lora_A." in pname or ".lora_B." in pname):
                if param.device not in gens:
                    gens[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                values = torch.randn(
                    param.shape, generator=gens[param.device], dtype=torch.float32, device=param.device
                )
                param.copy_(values * 0.01)


def prepare_adapters(
    model: torch.nn.Module,
    root: Path,
    adapter_ids: Sequence[str],
    ranks: Sequence[int],
    *,
    seed: int = 0,
    peft_model: Any = None,
    keep: bool = True,
    log: Any = print,
) -> Any:
    """Make (or load) PEFT adapters ``adapter_ids`` under ``root``; returns the PEFT model holding them.

    With ``keep=False`` each adapter is deleted from the PEFT model after it is saved (only the
    directories are wanted, e.g. the mixed-rank set for our engine).
    """
    from peft import PeftModel, get_peft_model

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    num_made = 0
    for i, (adapter_id, rank) in enumerate(zip(adapter_ids, ranks, strict=True)):
        path = root / adapter_id
        exists = (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
        if exists and json.loads((path / "adapter_config.json").read_text()).get("r") != rank:
            exists = False
        if exists:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(
                    model, str(path), adapter_name=adapter_id, autocast_adapter_dtype=False
                )
            else:
                peft_model.load_adapter(str(path), adapter_name=adapter_id, autocast_adapter_dtype=False)
        else:
            cfg = lora_config(rank)
            if peft_model is None:
                peft_model = get_peft_model(model, cfg, adapter_name=adapter_id, autocast_adapter_dtype=False)
            else:
                peft_model.add_adapter(adapter_id, cfg, autocast_adapter_dtype=False)
            _randomize_adapter(peft_model, adapter_id, seed * 100003 + i)
            peft_model.save_pretrained(str(root), selected_adapters=[adapter_id])
            # save_pretrained puts non-default adapters in root/<name>; keep that layout either way
            num_made += 1
        if not keep:
            peft_model.delete_adapter(adapter_id)
    if peft_model is not None:
        peft_model.eval()
    seconds = time.perf_counter() - t0
    log(f"[models] {len(adapter_ids)} adapters under {root} ({num_made} made) in {seconds:.1f}s")
    return peft_model


def write_adapters(
    spec: ModelSpec, root: Path, adapter_ids: Sequence[str], ranks: Sequence[int], *, seed: int = 0,
    log: Any = print,
) -> None:
    """PEFT-format adapter directories written directly (no PEFT model: seconds, not minutes), for
    runs where only our engine reads them. Random non-zero A and B as in ``_randomize_adapter``."""
    from loquetier.lora.adapter import LoRAAdapter
    from loquetier.lora.config import LoRAConfig
    from loquetier.lora.pool import ModelDims

    t0 = time.perf_counter()
    dims = ModelDims(spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.num_heads,
                     spec.num_kv_heads, spec.head_dim)
    num_made = 0
    for i, (adapter_id, rank) in enumerate(zip(adapter_ids, ranks, strict=True)):
        path = root / adapter_id
        config = path / "adapter_config.json"
        if config.is_file() and json.loads(config.read_text()).get("r") == rank:
            continue
        adapter = LoRAAdapter.new(LoRAConfig(rank=rank, alpha=2 * rank, target_modules=list(TARGET_MODULES)),
                                  dims, seed=seed * 100003 + i)
        gen = torch.Generator().manual_seed(seed * 100003 + i)
        for a, b in adapter.weights.values():
            a.copy_(torch.randn(a.shape, generator=gen) * 0.01)
            b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
        adapter.save(path)
        num_made += 1
    log(f"[models] {len(adapter_ids)} adapters under {root} ({num_made} written) in {time.perf_counter() - t0:.1f}s")


def unwrap_peft(peft_model: Any) -> torch.nn.Module:
    """The base model with every LoRA layer removed (for runs after the PEFT baseline)."""
    return peft_model.unload()  # type: ignore[no-any-return]
