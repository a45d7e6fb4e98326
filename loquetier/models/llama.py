"""LlamaModel: a compact Llama-family decoder that runs ONE forward over a packed mixed batch.

    model = LlamaModel.from_pretrained(dir, dtype=torch.bfloat16, device="cuda", lora_pool=pool)
    kv = model.make_kv_cache(num_blocks, block_size)
    out = model.forward(batch, kv)          # batch: ForwardBatch from BatchBuilder
    out.logits                              # [L, V] fp32, rows of batch.logits_seq_ids
    weighted_loss(out.loss_sum, denoms).backward()   # LoRA grads land in the pool's grad_a / grad_b

The hidden state is split at the embedding into ``h_train`` (rows [0, num_train), a leaf requiring
grad when autograd is on) and ``h_rest`` ([eval | prefill | decode], never in the graph). Every
linear is one ``lora_linear`` launch over both parts; norms, RoPE, SiLU·mul and attention run per
part, the rest part under ``no_grad``. Backward therefore touches training rows only.
Base weights are frozen (requires_grad False); only the LoRA slots of training adapters learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loquetier.kernels import SMLMMeta, lora_linear, variant_metas, warm_lora_linear
from loquetier.kernels.model_ops import fused_ops
from loquetier.lora.pool import LoRASlotPool, ModelDims

from .attention import Attention, write_kv
from .batch import ForwardBatch
from .config import ModelConfig
from .kv_cache import KVCache
from .loader import load_config, load_state_dict
from .loss import chunked_cross_entropy
from .rope import apply_rope, inv_frequencies, rope_cos_sin


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor | None  # [L, V] fp32, one row per batch.logits_indices
    loss_sum: torch.Tensor | None  # [G] fp32, differentiable through training rows
    token_count: torch.Tensor | None  # [G] int64 scored tokens per loss group
    correct: torch.Tensor | None  # [G] int64 argmax hits per loss group


@dataclass
class _Step:
    batch: ForwardBatch
    kv: KVCache | None
    cos_t: torch.Tensor  # [n_train, D]
    sin_t: torch.Tensor
    cos_r: torch.Tensor  # [n_rest, D]
    sin_r: torch.Tensor
    attention: Attention
    fused: ModuleType | None = None  # kernels/fused.py when the inference rows go through it
    # With the fused kernels: the last layer's MLP output for the inference rows, not yet added to
    # their residual stream: the next norm (a layer's input norm, or the final one) adds it in its
    # own pass (``add_rms_norm``), one elementwise launch a layer fewer.
    residual: torch.Tensor | None = None


def _norm_rest(h_r: torch.Tensor, w: torch.Tensor, eps: float, st: _Step) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_r plus the carried MLP output, its rms_norm) for the inference rows."""
    if st.fused is None:
        return h_r, rms_norm(h_r, w, eps)
    if st.residual is None or not h_r.shape[0]:
        return h_r, st.fused.rms_norm(h_r, w, eps)
    delta, st.residual = st.residual, None
    return st.fused.add_rms_norm(h_r, delta, w, eps)  # type: ignore[no-any-return]


# Whether the fused path carries each layer's MLP output into the next norm's pass (True) or adds it
# at the layer's end (False: one more elementwise launch a layer; the same bits). ``bench_decode``
# times both; a captured graph keeps the setting it was captured with.
CARRY_MLP_OUTPUT = True


def _add_rest(h_r: torch.Tensor, d_r: torch.Tensor, st: _Step) -> torch.Tensor:
    """The inference rows' residual stream after a layer's MLP: with the fused kernels (and rows),
    ``d_r`` is carried to the next norm instead of added here."""
    if st.fused is None or not CARRY_MLP_OUTPUT or not h_r.shape[0]:
        return h_r + d_r
    st.residual = d_r
    return h_r


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, scale in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _frozen(*shape: int, device: torch.device | str, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg, self.index, self.window = cfg, index, cfg.sliding_windows[index]
        h, inter, qkv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size
        kw = {"device": device, "dtype": dtype}
        self.input_norm = _frozen(h, **kw)
        self.post_norm = _frozen(h, **kw)
        self.qkv_weight = _frozen(qkv, h, **kw)  # [q + 2kv, H]
        self.o_weight = _frozen(h, cfg.q_size, **kw)
        self.gate_up_weight = _frozen(2 * inter, h, **kw)  # [2I, H]
        self.down_weight = _frozen(h, inter, **kw)
        self.qkv_bias = _frozen(qkv, **kw) if cfg.qkv_bias else None
        self.o_bias = _frozen(h, **kw) if cfg.o_bias else None
        self.gate_up_bias = _frozen(2 * inter, **kw) if cfg.mlp_bias else None
        self.down_bias = _frozen(h, **kw) if cfg.mlp_bias else None
        self.attach_lora_pool(None)

    def attach_lora_pool(self, pool: LoRASlotPool | None) -> None:
        if pool is None:
            self.qkv_loras, self.o_loras, self.gate_up_loras, self.down_loras = (), (), (), ()
            return
        get, cfg = (lambda name: pool.get(self.index, name)), self.cfg
        self.qkv_loras = (
            (get("q_proj"), 0),
            (get("k_proj"), cfg.q_size),
            (get("v_proj"), cfg.q_size + cfg.kv_size),
        )
        self.o_loras = ((get("o_proj"), 0),)
        self.gate_up_loras = ((get("gate_proj"), 0), (get("up_proj"), cfg.intermediate_size))
        self.down_loras = ((get("down_proj"), 0),)

    def forward(
        self, h_t: torch.Tensor, h_r: torch.Tensor, st: _Step, meta: SMLMMeta
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if h_t.shape[0] == 0:  # no training rows (every inference step): none of their ~20 empty ops
            with torch.no_grad():
                return h_t, self._forward_rest(h_t, h_r, st, meta)
        eps = self.cfg.rms_norm_eps
        x_t = rms_norm(h_t, self.input_norm, eps)
        with torch.no_grad():
            h_r, x_r = _norm_rest(h_r, self.input_norm, eps, st)
        qkv_t, qkv_r = lora_linear(x_t, x_r, self.qkv_weight, self.qkv_bias, self.qkv_loras, meta)
        a_t = self._attn_train(qkv_t, st)
        with torch.no_grad():
            a_r = self._attn_rest(qkv_r, st)
        o_t, o_r = lora_linear(a_t, a_r, self.o_weight, self.o_bias, self.o_loras, meta)
        h_t = h_t + o_t
        with torch.no_grad():
            if st.fused:
                h_r, x_r = st.fused.add_rms_norm(h_r, o_r, self.post_norm, eps)
            else:
                h_r = h_r + o_r
                x_r = rms_norm(h_r, self.post_norm, eps)
        x_t = rms_norm(h_t, self.post_norm, eps)
        gu_t, gu_r = lora_linear(x_t, x_r, self.gate_up_weight, self.gate_up_bias, self.gate_up_loras, meta)
        inter = self.cfg.intermediate_size
        m_t = F.silu(gu_t[:, :inter]) * gu_t[:, inter:]
        with torch.no_grad():
            m_r = st.fused.silu_mul(gu_r, inter) if st.fused else F.silu(gu_r[:, :inter]) * gu_r[:, inter:]
        d_t, d_r = lora_linear(m_t, m_r, self.down_weight, self.down_bias, self.down_loras, meta)
        with torch.no_grad():
            h_r = _add_rest(h_r, d_r, st)
        return h_t + d_t, h_r

    def _forward_rest(self, empty: torch.Tensor, h_r: torch.Tensor, st: _Step, meta: SMLMMeta) -> torch.Tensor:
        """``forward``'s rest part alone (``empty``: the training part, zero rows), under no_grad."""
        eps, f = self.cfg.rms_norm_eps, st.fused
        h_r, x_r = _norm_rest(h_r, self.input_norm, eps, st)
        qkv_r = lora_linear(empty, x_r, self.qkv_weight, self.qkv_bias, self.qkv_loras, meta)[1]
        a_r = self._attn_rest(qkv_r, st)
        o_r = lora_linear(empty, a_r, self.o_weight, self.o_bias, self.o_loras, meta)[1]
        if f:
            h_r, x_r = f.add_rms_norm(h_r, o_r, self.post_norm, eps)
        else:
            h_r = h_r + o_r
            x_r = rms_norm(h_r, self.post_norm, eps)
        gu_r = lora_linear(empty, x_r, self.gate_up_weight, self.gate_up_bias, self.gate_up_loras, meta)[1]
        inter = self.cfg.intermediate_size
        m_r = f.silu_mul(gu_r, inter) if f else F.silu(gu_r[:, :inter]) * gu_r[:, inter:]
        d_r = lora_linear(empty, m_r, self.down_weight, self.down_bias, self.down_loras, meta)[1]
        return _add_rest(h_r, d_r, st)

    def _split(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, n = self.cfg, qkv.shape[0]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = apply_rope(q.reshape(n, cfg.num_heads, cfg.head_dim), cos, sin)  # [n, Hq, D]
        k = apply_rope(k.reshape(n, cfg.num_kv_heads, cfg.head_dim), cos, sin)  # [n, Hkv, D]
        return q, k, v.reshape(n, cfg.num_kv_heads, cfg.head_dim)

    def _attn_train(self, qkv_t: torch.Tensor, st: _Step) -> torch.Tensor:
        if qkv_t.shape[0] == 0:
            return qkv_t.new_empty(0, self.cfg.q_size)
        q, k, v = self._split(qkv_t, st.cos_t, st.sin_t)
        out = st.attention.varlen(q, k, v, st.batch.train, self.cfg.head_dim**-0.5, self.window)
        return out.reshape(q.shape[0], -1)  # [n_train, Hq * D]

    def _attn_rest(self, qkv_r: torch.Tensor, st: _Step) -> torch.Tensor:
        if qkv_r.shape[0] == 0:
            return qkv_r.new_empty(0, self.cfg.q_size)
        b, scale, cfg = st.batch, self.cfg.head_dim**-0.5, self.cfg
        ne = b.num_eval  # evaluation rows first; the rest (prefill, decode) write and read the KV cache
        cache = None
        if qkv_r.shape[0] > ne:
            if st.kv is None:
                raise ValueError("prefill/decode rows need a KVCache")
            cache = (st.kv.k[self.index], st.kv.v[self.index], b.paged.slot_mapping, ne)
        if st.fused:  # RoPE and the KV writes in one launch
            q, k = st.fused.rope_qk(qkv_r, st.cos_r, st.sin_r, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                    cache=cache)
            v = qkv_r[:, cfg.q_size + cfg.kv_size :].reshape(-1, cfg.num_kv_heads, cfg.head_dim)
        else:
            q, k, v = self._split(qkv_r, st.cos_r, st.sin_r)
            if cache is not None:
                write_kv(cache[0], cache[1], k[ne:], v[ne:], cache[2])
        outs = [st.attention.varlen(q[:ne], k[:ne], v[:ne], b.eval, scale, self.window)] if ne else []
        if cache is not None:
            outs.append(st.attention.paged(q[ne:], cache[0], cache[1], b.paged, scale, self.window))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.reshape(q.shape[0], -1)  # [n_rest, Hq * D]


class LlamaModel(nn.Module):
    def __init__(  # noqa: PLR0917
        self,
        cfg: ModelConfig,
        device: torch.device | str = "cpu",
        lora_pool: LoRASlotPool | None = None,
        attn_impl: str = "auto",
        gradient_checkpointing: bool = False,
        max_model_len: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.gradient_checkpointing = cfg, gradient_checkpointing
        self._attention: Attention | None = None
        self.attn_impl = attn_impl
        kw = {"device": device, "dtype": cfg.dtype}
        self.embed_tokens = _frozen(cfg.vocab_size, cfg.hidden_size, **kw)  # [V, H]
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, device, cfg.dtype) for i in range(cfg.num_layers))
        self.norm = _frozen(cfg.hidden_size, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else _frozen(cfg.vocab_size, cfg.hidden_size, **kw)
        self.max_model_len = max_model_len
        self.inv_freq = inv_frequencies(cfg, max_model_len)  # [D/2] fp32, moved by forward
        self.lora_pool: LoRASlotPool | None = None
        self.attach_lora_pool(lora_pool)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        lora_pool: LoRASlotPool | None = None,
        **kwargs: object,
    ) -> LlamaModel:
        cfg = load_config(path, dtype)
        model = cls(cfg, device="meta", **kwargs)  # type: ignore[arg-type]
        model.load_state_dict(load_state_dict(path, cfg, device), strict=True, assign=True)
        model.attach_lora_pool(lora_pool)
        return model

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def attn_impl(self) -> str:
        """The attention implementation asked for (``attention.IMPLS``); setting it chooses again."""
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        self._attn_impl, self._attention = impl, None

    def attention(self, device: torch.device) -> Attention:
        """The model's attention on ``device``, chosen at the first forward (and again only when
        ``attn_impl`` or the device changes)."""
        if self._attention is None or self._attention.device != device:
            self._attention = Attention(self._attn_impl, device)
        return self._attention

    @property
    def dims(self) -> ModelDims:
        c = self.cfg
        return ModelDims(
            c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
        )

    def attach_lora_pool(self, pool: LoRASlotPool | None) -> None:
        if pool is not None and pool.dims != self.dims:
            raise ValueError(f"LoRA pool dims {pool.dims} do not match the model's {self.dims}")
        self.lora_pool = pool
        for layer in self.layers:
            layer.attach_lora_pool(pool)  # type: ignore[operator]

    @torch.no_grad()
    def warm_lora_launches(self, slot: int) -> int:
        """Run each LoRA-targeted linear of layer 0 (every layer has its shapes) once per segment
        layout of ``variant_metas``, on random rows of adapter ``slot``, through both forward paths
        (inference only, and with ``v`` kept as training steps do): every compiled variant of the
        forward SMLM launches is then built before a served step needs it. Returns how many
        linears ran (0 when the backend compiles nothing)."""
        layer = self.layers[0]
        groups = ((layer.qkv_weight, layer.qkv_bias, layer.qkv_loras),
                  (layer.o_weight, layer.o_bias, layer.o_loras),
                  (layer.gate_up_weight, layer.gate_up_bias, layer.gate_up_loras),
                  (layer.down_weight, layer.down_bias, layer.down_loras))
        runs = 0
        for meta in variant_metas(slot, self.device):
            for weight, bias, loras in groups:
                if not loras:
                    continue
                x = torch.randn(meta.num_tokens, weight.shape[1], dtype=weight.dtype, device=self.device)
                warm_lora_linear(x, weight, bias, loras, meta)
                runs += 1
        return runs

    def make_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        c = self.cfg
        return KVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, c.dtype, self.device)

    def forward(self, batch: ForwardBatch, kv: KVCache | None = None) -> ForwardOutput:
        n, dtype = batch.num_train, self.cfg.dtype
        emb = F.embedding(batch.input_ids, self.embed_tokens)  # [T, H]
        h_t, h_r = emb[:n], emb[n:]
        if n and torch.is_grad_enabled():
            h_t = h_t.detach().requires_grad_()  # graph root: only training rows enter autograd
        if self.inv_freq.device != emb.device:
            self.inv_freq = self.inv_freq.to(emb.device)
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq, dtype)  # [T, D]
        st = _Step(batch, kv, cos[:n], sin[:n], cos[n:], sin[n:], self.attention(emb.device), fused_ops(emb.device))
        checkpointing = self.gradient_checkpointing and h_t.requires_grad
        meta_t, meta_r = batch.split_metas() if checkpointing else (batch.meta, batch.meta)
        for layer in self.layers:
            if checkpointing:
                empty_t, empty_r = h_t[:0].detach(), h_r[:0]
                h_t = checkpoint(
                    lambda h, lyr=layer: lyr(h, empty_r, st, meta_t)[0], h_t, use_reentrant=False
                )
                with torch.no_grad():
                    h_r = layer(empty_t, h_r, st, meta_r)[1]
            else:
                h_t, h_r = layer(h_t, h_r, st, batch.meta)
        head = self.embed_tokens if self.lm_head is None else self.lm_head  # [V, H]
        eps = self.cfg.rms_norm_eps
        with torch.no_grad():
            h_r, hn_r = _norm_rest(h_r, self.norm, eps, st)
            logits = (hn_r[batch.logits_indices] @ head.T).float() if batch.logits_indices.numel() else None
        if not batch.num_loss_groups:
            return ForwardOutput(logits, None, None, None)
        g, ne = batch.num_loss_groups, batch.num_eval
        loss_t = chunked_cross_entropy(
            rms_norm(h_t, self.norm, eps), head, batch.labels[:n], batch.loss_groups[:n], g
        )
        with torch.no_grad():
            loss_e = chunked_cross_entropy(hn_r[:ne], head, batch.labels[n:], batch.loss_groups[n:], g)
        return ForwardOutput(logits, loss_t[0] + loss_e[0], loss_t[1] + loss_e[1], loss_t[2] + loss_e[2])
