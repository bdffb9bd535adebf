"""Causal self-attention (MHA / GQA / MQA, optional sliding window) with a preallocated KV cache.

Positions in a sequence are called *slots*: slot ``s`` is the ``s``-th token fed to the model
(padding included). Causality and the sliding window are rules on slots; an ``attention_mask [B, S]`` over
slots (1 = token, 0 = padding, as everywhere in llmzoo) removes padded keys. RoPE positions are the model's
business and arrive as ``rope``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmzoo.layers.init import init_linear
from llmzoo.layers.positions import apply_rope


class KVCache(nn.Module):
    """Keys and values of past slots, allocated once: ``k, v [B, num_kv_heads, size, head_dim]``.

    Writes are appends (:meth:`update`); ``length`` counts the slots seen so far. With a sliding ``window``
    the cache is a rolling buffer of ``window + max_rollback`` slots (slot ``s`` lives at ``s % size``) when
    that is shorter than ``max_length``, so its memory does not grow with the output. ``max_rollback`` is how
    many slots :meth:`truncate` may take back (speculative decoding); the rolling buffer keeps that
    many extra slots so that a rollback never loses a slot the window still needs.

    The static-shape path (a compiled decode step) writes with :meth:`write` at a tensor of slots and
    attends over the whole buffer under :meth:`mask`: no shape depends on how many slots are held.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, max_length: int,
                 window: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, max_rollback: int = 0):
        super().__init__()
        self.max_length, self.window = max_length, window
        size = max_length if window is None else min(max_length, window + max_rollback)
        self.rolling = size < max_length
        shape = (batch_size, num_kv_heads, size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # slot held by each buffer position (-1: empty); only needed by the rolling buffer
        self.register_buffer("slots", torch.full((size,), -1, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("all_slots", torch.arange(max_length, device=device), persistent=False)
        self.length = 0

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @property
    def newest_sees_all(self) -> bool:
        """Whether a query at the newest slot attends to every key :meth:`update` returned (so that, without
        padding, it needs no mask): no empty buffer positions, and no held slot outside the window."""
        held = min(self.length, self.size)
        return (not self.rolling or self.length >= self.size) and (self.window is None or held <= self.window)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append ``k, v [B, Hkv, T, Dh]``; return the keys and values to attend over and their slots."""
        start, new = self.length, k.shape[2]
        if start + new > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} slots; {start} used, {new} more asked")
        self.length = start + new
        new_slots = self.all_slots[start:start + new]
        if not self.rolling:
            self.k[:, :, start:start + new] = k
            self.v[:, :, start:start + new] = v
            return self.k[:, :, :start + new], self.v[:, :, :start + new], self.all_slots[:start + new]
        if new == 1:  # decode step: overwrite the oldest slot in place, attend over the buffer
            index = new_slots % self.size
            self.k.index_copy_(2, index, k)
            self.v.index_copy_(2, index, v)
            self.slots.index_copy_(0, index, new_slots)
            return self.k, self.v, self.slots
        # a chunk: its queries need the old buffer (if any) and all new keys; keep the newest `size` after
        keys, values, slots = k, v, new_slots
        if start > 0:
            keys, values, slots = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2), torch.cat([self.slots, slots])
        keep = min(new, self.size)
        index = new_slots[-keep:] % self.size
        self.k.index_copy_(2, index, k[:, :, -keep:])
        self.v.index_copy_(2, index, v[:, :, -keep:])
        self.slots.index_copy_(0, index, new_slots[-keep:])
        return keys, values, slots

    def write(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Static-shape write of ``k, v [B, Hkv, T, Dh]`` at the slots ``input_pos [T]`` (buffer positions
        ``input_pos % size``); returns the whole buffers ``[B, Hkv, size, Dh]``. ``length`` is the caller's to
        set (reading ``input_pos`` would cost a host sync). A rolling buffer takes at most ``max_rollback + 1``
        slots at once: more would overwrite keys the first of them still needs."""
        index = input_pos % self.size
        self.k.index_copy_(2, index, k)
        self.v.index_copy_(2, index, v)
        self.slots.index_copy_(0, index, input_pos)
        return self.k, self.v

    def mask(self, input_pos: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """SDPA's boolean mask ``[B or 1, 1, T, size]`` over the whole buffer for queries at the slots
        ``input_pos [T]`` (see :meth:`write`). Buffer position ``j`` holds, for query slot ``q``, the newest slot
        ``q - (q - j) % size`` (negative: not written yet); the causal, window and padding rules of
        :func:`slot_mask` apply to it. ``attention_mask [B, max_length]`` covers every slot of the call."""
        q = input_pos[:, None]
        held = q - (q - self.all_slots[:self.size]) % self.size  # [T, size]
        return slot_mask(input_pos, held, self.window, attention_mask)

    def truncate(self, length: int) -> None:
        """Forget the slots from ``length`` on (speculative decoding rolls back rejected tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of {self.length} slots to {length}")
        if self.rolling:
            if self.length - length > self.size - self.window:
                raise ValueError(f"cannot roll back {self.length - length} slots of a rolling KV cache with "
                                 f"{self.size - self.window} spare: set it up with a larger max_rollback")
            self.slots.masked_fill_(self.slots >= length, -1)
        self.length = length

    def reorder(self, rows: Tensor) -> None:
        """Make row ``i`` a copy of row ``rows[i]`` (``rows [B]``; beam search follows its beams)."""
        held = min(self.length, self.size)
        self.k[:, :, :held] = self.k[rows, :, :held]
        self.v[:, :, :held] = self.v[rows, :, :held]


def slot_mask(query_slots: Tensor, key_slots: Tensor, window: int | None = None,
              attention_mask: Tensor | None = None) -> Tensor:
    """SDPA's boolean mask ``[B or 1, 1, T, S]`` (True = attend) for queries at ``query_slots [T]``.

    A query sees keys at slots ``q - window < k <= q``; ``key_slots [S]`` (or ``[T, S]``: per query) of -1
    are empty cache entries; ``attention_mask [B, >= max slot + 1]`` (1 = real token) removes padded keys. A
    padded query still sees itself so that no row of the softmax is empty (its output is never used).
    """
    q, k = query_slots[:, None], key_slots if key_slots.ndim == 2 else key_slots[None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window
    if attention_mask is None:
        return allowed[None, None]
    real_keys = attention_mask.bool()[:, k.clamp(min=0)]  # [B, T or 1, S]
    return ((allowed[None] & real_keys) | (k == q)[None])[:, None]


class CausalSelfAttention(nn.Module):
    """Causal self-attention with ``num_kv_heads`` key/value heads (``num_heads``: MHA, 1: MQA).

    Each kv head serves a contiguous group of ``num_heads // num_kv_heads`` query heads. q, k and v
    come from one fused projection ``qkv``; ``out`` projects the heads back to ``embed_dim``.
    ``bias`` adds biases to both, ``qkv_bias`` (default: ``bias``) to ``qkv`` alone (Qwen2).
    ``sliding_window`` (Mistral) limits each query to the last ``sliding_window`` slots, itself included.
    ``q_norm`` / ``k_norm`` (Qwen3): modules normalising each query / key head ``[..., head_dim]`` before RoPE.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, dropout: float = 0.0,
                 sliding_window: int | None = None, qkv_bias: bool | None = None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}: "
                             f"pick a num_heads that divides it")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}: "
                             f"pick a num_kv_heads that divides it")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or embed_dim // num_heads
        self.dropout = dropout
        self.sliding_window = sliding_window
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim,
                             bias=bias if qkv_bias is None else qkv_bias)
        self.out = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias)
        self.q_norm, self.k_norm = q_norm, k_norm
        self.kv_cache: KVCache | None = None

    def init_weights(self, std: float, residual_std: float) -> None:
        """Normal(0, std) ``qkv``, Normal(0, residual_std) ``out`` (it writes into the residual stream), zero biases."""
        init_linear(self.qkv, std)
        init_linear(self.out, residual_std)

    def setup_kv_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None, max_rollback: int = 0) -> None:
        self.kv_cache = KVCache(batch_size, self.num_kv_heads, self.head_dim, max_length, self.sliding_window,
                                dtype=dtype or self.qkv.weight.dtype, device=device or self.qkv.weight.device,
                                max_rollback=max_rollback)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, input_pos: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        """``x [B, T, D]``; ``rope`` = (cos, sin) ``[B or 1, T, head_dim]``; ``attention_mask [B, S]``
        over all slots so far (cache included). Returns ``[B, T, D]``.

        Static shapes (a compiled decode step): ``input_pos [T]``, the slots of ``x``, written into the
        cache with :meth:`KVCache.write`; ``attn_mask``, the cache's :meth:`KVCache.mask`, built once per
        forward by the model, replaces ``attention_mask``."""
        B, T, _ = x.shape
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, Dh).transpose(1, 2)
        qk, v = qkv.split([H + Hkv, Hkv], dim=1)
        if self.q_norm is not None:
            q, k = qk.split([H, Hkv], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys rotated in one pass
        q, k = qk.split([H, Hkv], dim=1)

        window, mask, causal = self.sliding_window, None, False
        if input_pos is not None:  # static shapes: attend over the whole buffer
            k, v = self.kv_cache.write(k, v, input_pos)
            mask = attn_mask
        elif self.kv_cache is None:
            if attention_mask is None and (window is None or T <= window):
                causal = True  # SDPA's fused causal path
            else:
                slots = torch.arange(T, device=x.device)
                mask = slot_mask(slots, slots, window, attention_mask)
        else:
            cache, start = self.kv_cache, self.kv_cache.length
            k, v, key_slots = cache.update(k, v)
            if start == 0 and attention_mask is None and k.shape[2] == T and (window is None or T <= window):
                causal = True
            else:
                if not (T == 1 and attention_mask is None and cache.newest_sees_all):
                    query_slots = torch.arange(start, start + T, device=x.device)
                    mask = slot_mask(query_slots, key_slots, window, attention_mask)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=Hkv != H)
        return self.out(y.transpose(1, 2).reshape(B, T, H * Dh))
