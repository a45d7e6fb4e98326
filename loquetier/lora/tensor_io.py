"""Tensors + a JSON header in one safetensors blob (no pickle): adapters and checkpoints as bytes."""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import AdapterError

_HEADER_KEY = "loquetier"


def pack(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> bytes:
    """safetensors bytes whose ``__metadata__`` holds ``header`` as JSON under ``"loquetier"``."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(cpu, metadata={_HEADER_KEY: json.dumps(header, sort_keys=True)})


def header(data: bytes) -> dict[str, Any]:
    """The JSON header of a :func:`pack` blob, read without loading its tensors."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        value = json.loads(meta[_HEADER_KEY])
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise AdapterError(f"not a Loquetier safetensors blob: {str(exc)[:200]}") from exc
    if not isinstance(value, dict):
        raise AdapterError("safetensors header is not a JSON object")
    return value


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`pack`; malformed input raises :class:`AdapterError`."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        header = json.loads(meta[_HEADER_KEY])
        tensors = st_load(data)
    except (struct.error, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise AdapterError(f"not a Loquetier safetensors blob: {str(exc)[:200]}") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise AdapterError(f"corrupt safetensors blob: {exc}") from exc
    if not isinstance(header, dict):
        raise AdapterError("safetensors header is not a JSON object")
    return tensors, header
