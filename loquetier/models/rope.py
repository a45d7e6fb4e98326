"""Rotary position embeddings, computed per step from each row's position (no cache, no batch coupling).

RoPE types follow transformers: ``default``, ``linear`` (inverse frequencies / factor), ``llama3``
(wavelength-banded smoothing) and ``dynamic`` NTK. HF recomputes ``dynamic`` frequencies from the
longest sequence in the *batch*, which would make a row's numerics depend on its neighbours; here
the frequencies are fixed once from ``max_model_len``, which equals HF for every sequence when
``max_model_len <= max_position_embeddings`` (HF applies no scaling there).
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inv_frequencies(cfg: ModelConfig, max_model_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies, fp32 [head_dim // 2]."""
    dim = cfg.head_dim
    scaling = cfg.rope_scaling
    rope_type = cfg.rope_type
    base = cfg.rope_theta
    if rope_type == "dynamic":
        factor = float(scaling["factor"])
        seq_len = max(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        base = base * ((factor * seq_len / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [D/2]
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, object]) -> torch.Tensor:
    factor = float(scaling["factor"])  # type: ignore[arg-type]
    low = float(scaling["low_freq_factor"])  # type: ignore[arg-type]
    high = float(scaling["high_freq_factor"])  # type: ignore[arg-type]
    old_len = float(scaling["original_max_position_embeddings"])  # type: ignore[arg-type]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int -> (cos, sin) [T, D] in ``dtype`` (computed in fp32, as HF does)."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D]. Rotate-half convention (HF Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
