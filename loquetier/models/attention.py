"""Attention by row type: packed varlen (train/eval, no cache) and paged (prefill chunks + decode).

A model holds one :class:`Attention`: its implementations, chosen once from ``impl`` and the
device (``varlen_attention`` / ``paged_attention`` build one for a single call, for tests and
benchmarks). Implementations by ``impl``:

- ``"reference"``: plain torch, one sequence at a time, fp32 softmax. The spec and the CPU path.
- ``"sdpa"``: batched torch. Varlen: SDPA per sequence. Paged: gather each query group's keys
  through its block table into a padded [S, max_ctx] layout, one masked SDPA. Runs on CPU too.
- ``"flash"`` (CUDA): ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention) for varlen rows and,
  where that torch accepts ``block_table``, for paged rows (bottom-right causal alignment).
- ``"triton"``: paged decode rows (the q_len 1 groups after the prefill chunks) through the Triton
  kernel of ``kernels/paged_attention.py`` (through the op layer ``kernels/model_ops.py``);
  everything else as ``"auto"``. Needs CUDA, or the Triton
  interpreter (``TRITON_INTERPRET=1`` before the kernel module is first imported: tests).
- ``"auto"``: ``flash`` on CUDA when available (fp16/bf16; ``sdpa`` for fp32), else ``reference``; on CUDA,
  decode rows as ``"triton"``.

Masks follow HF: key ``j`` is visible from query ``i`` iff ``j <= i`` and, with a sliding window
``W``, ``i - W < j``. Shapes: q [n, Hq, D], k/v [n, Hkv, D]; caches [num_blocks, block_size, Hkv, D].
"""

from __future__ import annotations

import inspect
import warnings
from functools import cache
from types import ModuleType

import torch
import torch.nn.functional as F

from loquetier.kernels.model_ops import paged_decode_ops

from .batch import PagedMeta, VarlenMeta

IMPLS = ("reference", "sdpa", "flash", "triton", "auto")


@cache
def _varlen_attn() -> tuple[object | None, frozenset[str]]:
    """(varlen_attn, its keyword parameters) or (None, {}): the keywords differ across torch versions."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flash(  # noqa: PLR0917
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    scale: float,
    window: int | None,
    **extra: object,
) -> torch.Tensor:
    fn, params = _varlen_attn()
    kwargs: dict[str, object] = {"scale": scale, "window_size": (-1 if window is None else window - 1, 0)}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    out: torch.Tensor = fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs, **extra)  # type: ignore[operator]
    return out


def _decode_by_triton(impl: str, device: torch.device) -> bool:
    """Whether this impl sends paged decode rows to the Triton kernel."""
    if impl == "auto":
        return device.type == "cuda" and paged_decode_ops() is not None
    if impl != "triton":
        return False
    mod = paged_decode_ops()
    if mod is None or (device.type != "cuda" and not mod.INTERPRET):
        raise ValueError("attention impl 'triton' needs Triton and CUDA (or TRITON_INTERPRET=1)")
    return True


def decode_uses_triton(impl: str, device: torch.device) -> bool:
    """Whether decode rows on ``device`` go to the Triton paged-decode kernel (no error raised)."""
    try:
        return _decode_by_triton(impl, device)
    except ValueError:
        return False


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The impl of varlen rows and prefill chunks; decode rows: ``_decode_by_triton``. FlashAttention
    takes fp16/bf16 only: fp32 on CUDA goes to ``"sdpa"`` under ``"auto"``."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    half = dtype in (torch.float16, torch.bfloat16)
    if impl in ("auto", "triton"):
        if device.type != "cuda":
            return "reference"
        return "flash" if half and _varlen_attn()[0] is not None else "sdpa"
    if impl == "flash" and (device.type != "cuda" or _varlen_attn()[0] is None or not half):
        raise ValueError("attention impl 'flash' needs CUDA, fp16/bf16 and torch.nn.attention.varlen")
    return impl


def attend_ref(  # noqa: PLR0917
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Semantics: out[i] = softmax_j(q[i]·k[j] * scale, visible(i, j)) @ v, with GQA head sharing.
    q [n, Hq, D], k/v [m, Hkv, D], q_pos [n], k_pos [m] -> [n, Hq, D] in q's dtype."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)  # [m, Hq, D]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale  # [Hq, n, m]
    scores = scores.masked_fill(~_visible(q_pos, k_pos, window), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    mask = k_pos[None, :] <= q_pos[:, None]  # [n, m]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


class Attention:
    """The attention of one model: its implementations, chosen once from ``impl`` and the device.

    Packed rows and prompt chunks take ``resolve_impl`` for their dtype (resolved once per dtype);
    decode rows go to the Triton paged-decode kernel when ``impl`` sends them there (decided at the
    first decode rows, so an impl that cannot serve them fails only where they come). If this
    torch's paged FlashAttention rejects our layout, ``paged_flash_error`` keeps why, and paged
    rows take gather + SDPA from then on.
    """

    def __init__(self, impl: str, device: torch.device) -> None:
        if impl not in IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
        self.impl, self.device = impl, device
        self.paged_flash_error: str | None = None
        self._rows: dict[torch.dtype, str] = {}
        self._decode: ModuleType | None | bool = False  # False: not decided yet

    def rows_impl(self, dtype: torch.dtype) -> str:
        """The resolved impl of packed rows and prompt chunks of ``dtype``."""
        impl = self._rows.get(dtype)
        if impl is None:
            impl = self._rows[dtype] = resolve_impl(self.impl, self.device, dtype)
        return impl

    def decode_kernels(self) -> ModuleType | None:
        """The paged-decode kernel module when decode rows go to it, else None."""
        if self._decode is False:
            self._decode = paged_decode_ops() if _decode_by_triton(self.impl, self.device) else None
        assert self._decode is not True
        return self._decode

    def varlen(  # noqa: PLR0917
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: VarlenMeta,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """Causal attention within each packed sequence. q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D].
        Differentiable (used with autograd for training rows)."""
        if q.shape[0] == 0:
            return q.new_empty(q.shape)
        impl = self.rows_impl(q.dtype)
        if impl == "flash":
            cu, n = meta.cu_seqlens, meta.max_seqlen
            return _flash(q, k, v, cu, cu, n, n, scale, window)
        outs, start = [], 0
        for n in meta.host_seqlens:
            qs, ks, vs = q[start : start + n], k[start : start + n], v[start : start + n]
            pos = torch.arange(n, device=q.device)
            if impl == "sdpa":
                mask = _visible(pos, pos, window)
                o = F.scaled_dot_product_attention(
                    qs.transpose(0, 1),
                    ks.transpose(0, 1),
                    vs.transpose(0, 1),
                    attn_mask=mask,
                    scale=scale,
                    enable_gqa=True,
                )
                outs.append(o.transpose(0, 1))
            else:
                outs.append(attend_ref(qs, ks, vs, pos, pos, scale, window))
            start += n
        return torch.cat(outs)

    def paged(  # noqa: PLR0917
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: PagedMeta,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """Attention of prefill chunks and decode rows over their cached context (this step's K/V
        already written). q [P + D, Hq, D] -> [P + D, Hq, D]. Inference only."""
        if q.shape[0] == 0:
            return q.new_empty(q.shape)
        rest = self.rows_impl(q.dtype)
        num_pre = meta.num_prefill_seqs
        kernels = self.decode_kernels() if num_pre < meta.num_seqs else None
        if kernels is not None and meta.row_tiles is not None and num_pre == 0:
            # graph rows: prompt tokens and decode rows alike, each a row, attended in tiles
            tiled: torch.Tensor = kernels.paged_tiles(q.to(k_cache.dtype), k_cache, v_cache, meta.block_tables,
                                                      meta.context_lens, meta.row_tiles, scale, window)
            return tiled.to(q.dtype)
        if kernels is None:
            return self._paged(q, k_cache, v_cache, meta, scale, window, rest)
        pre_rows = sum(meta.host_q_lens[:num_pre])
        dec: torch.Tensor = kernels.paged_decode(
            q[pre_rows:].to(k_cache.dtype),  # [D, Hq, D], one row per decode sequence
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            scale,
            max(meta.host_context_lens[num_pre:]),
            window,
            seq_offset=num_pre,
        )
        dec = dec.to(q.dtype)
        if num_pre == 0:
            return dec
        pre = self._paged(q[:pre_rows], k_cache, v_cache, _prefill_part(meta, num_pre), scale, window, rest)
        return torch.cat([pre, dec])

    def _paged(  # noqa: PLR0917
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: PagedMeta,
        scale: float,
        window: int | None,
        impl: str,
    ) -> torch.Tensor:
        """``paged`` over every query group with a resolved impl (reference, sdpa or flash)."""
        if impl in ("flash", "sdpa") and _has_packed_keys(meta):
            return paged_packed(q, k_cache, v_cache, meta, scale, window, impl)
        if impl == "flash" and "block_table" in _varlen_attn()[1] and self.paged_flash_error is None:
            try:
                return _flash(
                    q,
                    k_cache,
                    v_cache,
                    meta.q_cu_seqlens,
                    None,
                    meta.max_q_len,
                    meta.max_context_len,
                    scale,
                    window,
                    seqused_k=meta.context_lens,
                    block_table=meta.block_tables,
                )
            except RuntimeError as exc:  # e.g. a page size this FlashAttention build does not take
                warnings.warn(f"paged varlen_attn unavailable ({exc}); using gather + SDPA", stacklevel=3)
                self.paged_flash_error = str(exc)
        if impl in ("sdpa", "flash"):
            return _paged_sdpa(q, k_cache, v_cache, meta, scale, window)
        bs = k_cache.shape[1]
        outs, start = [], 0
        for q_len, ctx, table in zip(
            meta.host_q_lens, meta.host_context_lens, meta.host_block_tables, strict=True
        ):
            blocks = torch.tensor(table[: (ctx + bs - 1) // bs], dtype=torch.int64, device=q.device)
            ks = k_cache[blocks].flatten(0, 1)[:ctx]  # [ctx, Hkv, D]
            vs = v_cache[blocks].flatten(0, 1)[:ctx]
            k_pos = torch.arange(ctx, device=q.device)
            outs.append(attend_ref(q[start : start + q_len], ks, vs, k_pos[ctx - q_len :], k_pos, scale, window))
            start += q_len
        return torch.cat(outs)


def varlen_attention(  # noqa: PLR0917
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMeta,
    scale: float,
    window: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``Attention(impl, q.device).varlen(...)``: one call (tests, benchmarks); a model keeps its own."""
    return Attention(impl, q.device).varlen(q, k, v, meta, scale, window)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k_cache/v_cache [num_blocks, block_size, Hkv, D]; k/v [n, Hkv, D]; slot_mapping [n] int64."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(  # noqa: PLR0917
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedMeta,
    scale: float,
    window: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``Attention(impl, q.device).paged(...)``: one call (tests, benchmarks); a model keeps its own."""
    return Attention(impl, q.device).paged(q, k_cache, v_cache, meta, scale, window)


def _prefill_part(meta: PagedMeta, num_pre: int) -> PagedMeta:
    """The first ``num_pre`` query groups (the prefill chunks) of ``meta`` alone; device views, no sync."""
    rows = sum(meta.host_q_lens[:num_pre])
    return PagedMeta(
        q_cu_seqlens=meta.q_cu_seqlens[: num_pre + 1],
        context_lens=meta.context_lens[:num_pre],
        block_tables=meta.block_tables[:num_pre],
        slot_mapping=meta.slot_mapping[:rows],
        max_q_len=max(meta.host_q_lens[:num_pre]),
        max_context_len=max(meta.host_context_lens[:num_pre]),
        num_prefill_seqs=num_pre,
        host_q_lens=meta.host_q_lens[:num_pre],
        host_context_lens=meta.host_context_lens[:num_pre],
        host_block_tables=meta.host_block_tables[:num_pre],
        prefill_key_slots=meta.prefill_key_slots,
        prefill_cu_keys=meta.prefill_cu_keys,
    )


def _has_packed_keys(meta: PagedMeta) -> bool:
    """Whether ``meta``'s groups are exactly the prefill chunks whose keys the batch packed."""
    return meta.prefill_key_slots is not None and meta.num_seqs == meta.num_prefill_seqs


def paged_packed(  # noqa: PLR0917
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedMeta,
    scale: float,
    window: int | None,
    impl: str = "flash",
) -> torch.Tensor:
    """Prefill chunks over their context: gather each chunk's keys out of the paged cache into one
    packed varlen layout (``meta.prefill_key_slots``, one index_select per cache), then causal varlen
    attention with bottom-right alignment (a chunk's rows are the last ``q_len`` of its keys). With
    ``impl="flash"`` one FlashAttention launch; ``"sdpa"`` one masked SDPA per chunk (fp32 on a GPU);
    otherwise ``attend_ref`` per chunk. Only each chunk's own keys are read: cache slots past a context
    (stale or never written) cannot reach the output, as they can through a padded gather. No host
    sync and no per-shape plan: a served step never waits on a backend's first build."""
    assert meta.prefill_key_slots is not None and meta.prefill_cu_keys is not None
    kf = k_cache.flatten(0, 1).index_select(0, meta.prefill_key_slots)  # [sum ctx, Hkv, D]
    vf = v_cache.flatten(0, 1).index_select(0, meta.prefill_key_slots)
    if impl == "flash":
        return _flash(q, kf, vf, meta.q_cu_seqlens, meta.prefill_cu_keys, meta.max_q_len, meta.max_context_len,
                      scale, window)
    outs, q0, k0 = [], 0, 0
    for q_len, ctx in zip(meta.host_q_lens, meta.host_context_lens, strict=True):
        k_pos = torch.arange(ctx, device=q.device)
        qs, ks, vs = q[q0 : q0 + q_len], kf[k0 : k0 + ctx], vf[k0 : k0 + ctx]
        if impl == "sdpa":
            mask = _visible(k_pos[ctx - q_len :], k_pos, window)
            o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                               attn_mask=mask, scale=scale, enable_gqa=True)
            outs.append(o.transpose(0, 1))
        else:
            outs.append(attend_ref(qs, ks, vs, k_pos[ctx - q_len :], k_pos, scale, window))
        q0, k0 = q0 + q_len, k0 + ctx
    return torch.cat(outs)


def _paged_sdpa(  # noqa: PLR0917
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedMeta,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Gather + one padded, masked SDPA over all query groups."""
    bs, dev = k_cache.shape[1], q.device
    num_seqs, max_q = meta.num_seqs, meta.max_q_len
    width = (meta.max_context_len + bs - 1) // bs
    tables = meta.block_tables[:, :width].long()  # [S, nb]
    ks = k_cache[tables].flatten(1, 2)  # [S, nb * bs, Hkv, D]
    vs = v_cache[tables].flatten(1, 2)
    q_lens = meta.q_cu_seqlens[1:] - meta.q_cu_seqlens[:-1]  # [S]
    row_seq = torch.repeat_interleave(torch.arange(num_seqs, device=dev), q_lens)  # [n]
    row_idx = torch.arange(q.shape[0], device=dev) - meta.q_cu_seqlens[:-1].long()[row_seq]  # [n]
    qp = q.new_zeros(num_seqs, max_q, *q.shape[1:])  # [S, max_q, Hq, D]
    qp[row_seq, row_idx] = q
    ctx = meta.context_lens.long()  # [S]
    q_pos = ctx[:, None] - q_lens[:, None] + torch.arange(max_q, device=dev)[None]  # [S, max_q]
    k_pos = torch.arange(ks.shape[1], device=dev)  # [K]
    mask = (k_pos[None, None] <= q_pos[..., None]) & (k_pos[None, None] < ctx[:, None, None])
    if window is not None:
        mask &= k_pos[None, None] > q_pos[..., None] - window
    mask |= ~mask.any(-1, keepdim=True)  # padded query rows: any finite row, discarded below
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),
        ks.transpose(1, 2),
        vs.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)[row_seq, row_idx]  # [n, Hq, D]
