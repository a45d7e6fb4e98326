"""Read a local HF checkpoint directory into our fused parameter layout.

A directory holds ``config.json`` and either ``model.safetensors`` or ``model.safetensors.index.json``
plus its shards. Weights are renamed and fused on the way in::

    model.embed_tokens.weight                        -> embed_tokens
    model.layers.{i}.input_layernorm.weight          -> layers.{i}.input_norm
    model.layers.{i}.self_attn.{q,k,v}_proj.{w,b}    -> layers.{i}.qkv_weight [q+2kv, H] / qkv_bias
    model.layers.{i}.self_attn.o_proj.{w,b}          -> layers.{i}.o_weight / o_bias
    model.layers.{i}.post_attention_layernorm.weight -> layers.{i}.post_norm
    model.layers.{i}.mlp.{gate,up}_proj.{w,b}        -> layers.{i}.gate_up_weight [2I, H] / gate_up_bias
    model.layers.{i}.mlp.down_proj.{w,b}             -> layers.{i}.down_weight / down_bias
    model.norm.weight                                -> norm
    lm_head.weight (absent when tied)                -> lm_head
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or lacks a tensor."""


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the file holding it."""
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{path / INDEX_FILE} is not a valid safetensors index: {exc}") from exc
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in {INDEX_FILE} is missing from {path}")
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (only safetensors checkpoints are read)"
        )
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {single}: {exc}") from exc


def load_state_dict(
    path: str | Path,
    cfg: ModelConfig,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Our parameter name -> tensor (cfg.dtype, on ``device``), fused as in the module docstring."""
    path = Path(path)
    files = _weight_files(path)
    handles: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor:
        if name not in files:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {path}")
        f = files[name]
        try:
            if f not in handles:
                handles[f] = safe_open(f, framework="pt", device="cpu")
            tensor = handles[f].get_tensor(name)  # type: ignore[attr-defined]
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {name!r} from {f}: {exc}") from exc
        return tensor.to(device=device, dtype=cfg.dtype)

    state = {"embed_tokens": get("model.embed_tokens.weight"), "norm": get("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        state["lm_head"] = get("lm_head.weight")
    for i in range(cfg.num_layers):
        p, out = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        state[out + "input_norm"] = get(p + "input_layernorm.weight")
        state[out + "post_norm"] = get(p + "post_attention_layernorm.weight")
        state[out + "qkv_weight"] = torch.cat([get(attn + f"{x}_proj.weight") for x in "qkv"])
        state[out + "o_weight"] = get(attn + "o_proj.weight")
        state[out + "gate_up_weight"] = torch.cat(
            [get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")]
        )
        state[out + "down_weight"] = get(mlp + "down_proj.weight")
        if cfg.qkv_bias:
            state[out + "qkv_bias"] = torch.cat([get(attn + f"{x}_proj.bias") for x in "qkv"])
        if cfg.o_bias:
            state[out + "o_bias"] = get(attn + "o_proj.bias")
        if cfg.mlp_bias:
            state[out + "gate_up_bias"] = torch.cat([get(mlp + "gate_proj.bias"), get(mlp + "up_proj.bias")])
            state[out + "down_bias"] = get(mlp + "down_proj.bias")
    return state


def load_config(path: str | Path, dtype: torch.dtype | None = None) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    return ModelConfig.from_json(path / "config.json", dtype)
