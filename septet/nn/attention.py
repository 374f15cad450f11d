"""Multi-head attention with grouped/multi-query K/V, causal and banded masks, and a KV cache.

One module covers MHA (n_kv_head == n_head), GQA (1 < n_kv_head < n_head, LLaMA-2 style)
and MQA (n_kv_head == 1, PaLM). The mask kind is a property of the layer (`window`), the
rest of the geometry (rotary angles, relative bias) arrives per call in an `AttnContext`
computed once per forward pass by the model.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .fused import linear_cat, pack_linears, should_fuse
from .positions import apply_rope


class AttnContext(NamedTuple):
    """What every layer needs about positions for one forward call."""

    cos: torch.Tensor | None = None  # (T, D/2) or (B, T, D/2) rotary angles
    sin: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # (1, H, T, S) additive logits bias, S = keys incl. cache
    rope_style: str = "half"
    # (B, S) bool, True = a real key, False = padding (left-padded batched generation)
    pad_mask: torch.Tensor | None = None


class KVCache:
    """Preallocated keys and values: per layer one (B, H_kv, T_max, D) tensor each.

    `pos` is the number of filled slots; a model forward writes its T new entries at
    [pos, pos + T) in every layer, then advances `pos` once. Layers get separate tensors
    (not views of one (L, ...) tensor) so a compiled decode step can update each in place;
    writing through a view of a shared base makes the compiler copy it.

    The cache owns its row operations (reorder, select, append, grow): nobody else replaces
    its tensors. `attend_one` is where a subclass may put a faster exact kernel for one
    query over a padded cache (septet.inference.engine does); here it declines.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, d_head: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_kv_head, max_len, d_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > {self.max_len} slots; "
                             "allocate a larger cache or shorten the input")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self, pos: int = 0) -> None:
        """Forget every slot from `pos` on (they are overwritten by the next writes)."""
        self.pos = pos

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   pad_mask: torch.Tensor) -> torch.Tensor | None:
        """One query per row, q (B, H, 1, D), over keys k, v (B, H_kv, S, D) of which
        `pad_mask` (B, S) marks the real ones -> (B, H, 1, D), or None for "use SDPA"."""
        return None

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (R,) in that order (repeats allowed: beam search's survivors)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]

    def select(self, rows: torch.Tensor, max_len: int | None = None) -> "KVCache":
        """A new cache of `max_len` slots (default: this one's) holding rows `rows` (R,) of this
        one's filled slots, at the same `pos`."""
        n = max_len or self.max_len
        if n < self.pos:
            raise ValueError(f"a cache of {n} slots cannot hold {self.pos} filled ones")
        out = copy.copy(self)
        shape = lambda t: (len(rows), t.shape[1], n, t.shape[3])  # noqa: E731
        out.k = [t.new_zeros(shape(t)) for t in self.k]
        out.v = [t.new_zeros(shape(t)) for t in self.v]
        for dst, src in zip(out.k + out.v, self.k + self.v):
            dst[:, :, :self.pos] = src[rows, :, :self.pos]
        out.max_len = n
        return out

    def grow(self, max_len: int) -> None:
        """Make room for `max_len` slots in every row (new slots are empty)."""
        extra = max_len - self.max_len
        if extra > 0:
            self.k = [torch.cat((t, t.new_zeros(*t.shape[:2], extra, t.shape[3])), dim=2) for t in self.k]
            self.v = [torch.cat((t, t.new_zeros(*t.shape[:2], extra, t.shape[3])), dim=2) for t in self.v]
            self.max_len = max_len

    def append_rows(self, other: "KVCache") -> None:
        """Add `other`'s rows after this cache's; both have the same slots and `pos`."""
        if other.max_len != self.max_len or other.pos != self.pos:
            raise ValueError(f"cannot append a cache of {other.max_len} slots at {other.pos} to one of "
                             f"{self.max_len} at {self.pos}")
        self.k = [torch.cat((a, b)) for a, b in zip(self.k, other.k)]
        self.v = [torch.cat((a, b)) for a, b in zip(self.v, other.v)]


def band_mask(T: int, S: int, q_start: int, window: int | None) -> torch.Tensor:
    """Boolean (T, S) mask: query at absolute position q_start+i sees key j iff
    j <= q_start+i and (window is None or j > q_start+i-window)."""
    i = torch.arange(q_start, q_start + T)[:, None]
    j = torch.arange(S)[None, :]
    mask = j <= i
    if window is not None:
        mask &= j > i - window
    return mask


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention over the last `window` keys, in O(T·window) time and memory.

    The sequence is cut into blocks of `window` queries; block b can only see keys of
    blocks b−1 and b, so each block attends to 2·window keys instead of T (the local
    pattern of the Sparse Transformer that GPT-3 alternates with dense layers).
    q, k, v: (B, H, T, D) with equal head counts.
    """
    B, H, T, D = q.shape
    w = window
    nb = math.ceil(T / w)
    pad = nb * w - T
    # (batch·heads, blocks, ...): blocks take SDPA's head axis, so its fused 4-D kernel
    # runs and one (blocks, w, 2w) mask broadcasts over batch and heads
    qb = F.pad(q, (0, 0, 0, pad)).reshape(B * H, nb, w, D)
    # one block of zeros in front so block 0 has a (fully masked) predecessor
    kp = F.pad(k, (0, 0, w, pad)).reshape(B * H, nb + 1, w, D)
    vp = F.pad(v, (0, 0, w, pad)).reshape(B * H, nb + 1, w, D)
    kb = torch.cat((kp[:, :-1], kp[:, 1:]), dim=2)  # (B·H, nb, 2w, D)
    vb = torch.cat((vp[:, :-1], vp[:, 1:]), dim=2)
    a = torch.arange(w)[:, None]
    c = torch.arange(2 * w)[None, :]
    mask = ((c > a) & (c <= a + w)).expand(nb, w, 2 * w).clone()  # key offset in (−w, 0]
    mask[0, :, :w] = False  # the zero block before the sequence start
    # a 4-D mask: SDPA takes its fused kernel only for those (a 3-D one falls back to math)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[None].to(q.device))
    return y.reshape(B, H, nb * w, D)[:, :, :T]


def dense_band_limit(dtype: torch.dtype) -> int:
    """Up to T = limit x window, one masked dense SDPA beats the blocked kernel's extra copies
    (docs/benchmarks.md); below the limit the dense cost T^2 is at most limit x T x window,
    so attention still grows as T x window."""
    return 4 if dtype == torch.float32 else 8


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int = 0,
           window: int | None = None, bias: torch.Tensor | None = None,
           pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, H_kv, S, D), S = q_start + T.

    Picks the cheapest exact path: SDPA's causal kernel when no explicit mask is needed,
    the blocked banded kernel for long windowed prefills, an explicit mask otherwise.
    `pad_mask` (B, S) bool hides padding keys (False) from every query of its row; a query
    always sees its own slot, so a padding query's (unused) row is never all -inf.
    """
    H, Hkv = q.shape[1], k.shape[1]
    T, S = q.shape[2], k.shape[2]
    gqa = H != Hkv
    window_matters = window is not None and S > window
    if pad_mask is not None:
        if T == 1 and not window_matters:  # decoding: the causal part is all True
            mask = pad_mask[:, None, None, :]
        else:
            mask = band_mask(T, S, q_start, window).to(q.device)
            diag = torch.arange(S, device=q.device)[None, :] == \
                torch.arange(q_start, q_start + T, device=q.device)[:, None]
            mask = (mask & pad_mask[:, None, None, :]) | diag  # (B, 1, T, S)
        if bias is not None:
            mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if bias is None and not window_matters:
        if q_start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if T == 1:  # one new token sees the whole cache
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if window_matters and q_start == 0 and bias is None and T > window * dense_band_limit(q.dtype):
        if gqa:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        return banded_attention(q, k, v, window)
    mask = band_mask(T, S, q_start, window).to(q.device)
    if bias is not None:
        mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, n_kv_head: int, d_head: int, *,
                 bias: bool = False, window: int | None = None, layer_idx: int = 0):
        super().__init__()
        if n_head % n_kv_head:
            raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}")
        self.n_head, self.n_kv_head, self.d_head = n_head, n_kv_head, d_head
        self.window = window
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(d_model, n_head * d_head, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_head * d_head, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_head * d_head, bias=bias)
        self.o_proj = nn.Linear(n_head * d_head, d_model, bias=bias)
        self.qkv_proj: nn.Module | None = None  # q, k, v packed into one layer (pack_qkv)

    def pack_qkv(self) -> None:
        """Pack q, k and v into one layer for inference: one matmul where there were three,
        without concatenating weights per call. The separate layers are dropped."""
        if self.qkv_proj is None and isinstance(self.q_proj, nn.Linear):
            self.qkv_proj = pack_linears([self.q_proj, self.k_proj, self.v_proj])
            self.q_proj = self.k_proj = self.v_proj = None

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.d_head
        if self.qkv_proj is not None or should_fuse(x):
            # one matmul for q, k, v: packed once for inference, or concatenated per call
            # for long training/prefill inputs; then q and k rotated in one pass
            if self.qkv_proj is not None:
                qkv = self.qkv_proj(x)
            else:
                qkv = linear_cat(x, [self.q_proj, self.k_proj, self.v_proj])
            qkv = qkv.view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H + 2·Hkv, T, D)
            qk, v = qkv.split((H + Hkv, Hkv), dim=1)
            if ctx.cos is not None:
                qk = apply_rope(qk, ctx.cos, ctx.sin, ctx.rope_style)
            q, k = qk.split((H, Hkv), dim=1)
        else:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
            if ctx.cos is not None:
                q = apply_rope(q, ctx.cos, ctx.sin, ctx.rope_style)
                k = apply_rope(k, ctx.cos, ctx.sin, ctx.rope_style)
        q_start = 0
        y = None
        if cache is not None:
            q_start = cache.pos
            k, v = cache.update(self.layer_idx, k, v)
            if T == 1 and ctx.pad_mask is not None and ctx.bias is None and \
                    (self.window is None or k.shape[2] <= self.window):
                y = cache.attend_one(q, k, v, ctx.pad_mask)
        if y is None:
            y = attend(q, k, v, q_start=q_start, window=self.window, bias=ctx.bias,
                       pad_mask=ctx.pad_mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
