"""The compiled decode step: one token with static shapes, so torch.compile builds one graph for all steps.

The eager decode reads `cache.pos` (a Python int) and attends to the `pos + 1` filled
slots, so every step has new shapes: under torch.compile that is a recompile or a
symbolic-shape graph each time. Here the step is written the way static-cache engines
write it (gpt-fast, HF's StaticCache): the new key/value go to a slot given as a *tensor*,
attention reads all S slots of the preallocated cache, and a boolean key mask hides the
empty and padding slots. Shapes then depend only on (B, S), and inductor can fuse the
norms, rotary and residual arithmetic of all layers into a few kernels around the matmuls.

Exact for every model whose attention is a plain causal softmax over the cache (LLaMA,
PaLM, GPT-4-style, GPT-3's dense layers): masked slots get zero weight. The model says
where it is not (`DecoderLM.exact_under_key_mask`: banded layers shorter than the cache,
LaMDA's relative bias); those use the eager step instead.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

from ... import env, kernels
from ...models.base import DecoderLM
from ...nn.attention import KVCache
from ..kv_cache import kernel_attend_one


class SlotCache:
    """A KVCache as the static step sees it: writes at `slot` (a (1,) int64 tensor), reads all.

    `pos` is 0 because attention only uses it to place a causal mask, and a single query
    with an explicit key mask (`AttnContext.pad_mask`) needs none.
    """

    pos = 0

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], slot: torch.Tensor):
        self.k, self.v, self.slot = k, v, slot  # per layer (B, H_kv, S, D); slot (1,)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.slot, k)  # k: (B, H_kv, 1, D)
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]  # (B, H_kv, S, D)

    def advance(self, n: int) -> None:  # the caller moves the real cache's pos
        pass

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   pad_mask: torch.Tensor) -> torch.Tensor | None:
        return kernel_attend_one(q, k, v, pad_mask)


def supports_static_decode(model: DecoderLM, max_len: int) -> bool:
    """True when attending to all `max_len` slots under a key mask is exact for `model`."""
    return model.exact_under_key_mask(max_len)


def _step(model: DecoderLM, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
          k: list[torch.Tensor], v: list[torch.Tensor], slot: torch.Tensor) -> torch.Tensor:
    """tokens (B, 1), positions (B, 1), key_mask (B, S) -> logits (B, V); writes slot `slot`."""
    visible = key_mask & (torch.arange(k[0].shape[2], device=slot.device) <= slot)  # (B, S)
    cache = SlotCache(k, v, slot)
    x = model.hidden_states(model.embed(tokens, positions), positions, cache=cache,  # type: ignore[arg-type]
                            pad_mask=visible)
    return model.head_logits(x)[:, -1]  # (B, V)


class _Graph:
    """One CUDA graph of the compiled step, bound to one cache's tensors (by address).

    On a GPU a 135M-parameter model's decode step is a few hundred small kernels, and
    launching them costs more than running them; replaying a captured graph launches them
    all at once. Inputs are copied into static buffers, the output is read from one.
    """

    def __init__(self, fn: Callable, model: DecoderLM, tokens: torch.Tensor, positions: torch.Tensor,
                 key_mask: torch.Tensor, cache: KVCache):
        self.tokens, self.positions = tokens.clone(), positions.clone()
        self.key_mask = key_mask.clone()
        self.slot = torch.tensor([cache.pos], device=tokens.device)
        args = (model, self.tokens, self.positions, self.key_mask, cache.k, cache.v, self.slot)
        # warm up on a side stream (compiles; writes the same k/v the real step writes)
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*args)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = fn(*args)  # (B, V), rewritten by every replay

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                 pos: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.key_mask.copy_(key_mask)
        self.slot.fill_(pos)
        self.graph.replay()
        return self.logits.clone()  # callers may keep it past the next step


def _graph_key(tokens: torch.Tensor, key_mask: torch.Tensor, cache: KVCache) -> tuple:
    # a graph is valid exactly while every cache tensor is at the address it was captured at
    return (tuple(tokens.shape), tuple(key_mask.shape), tokens.device,
            tuple(t.data_ptr() for t in cache.k), tuple(t.data_ptr() for t in cache.v))


class StaticDecoder:
    """Compiled decode steps for one model: `step(tokens, positions, key_mask, cache)`.

    One compiled graph per (B, S, dtype); the real cache's `pos` is advanced here, outside
    the graph, so the compiled code never sees a changing Python int. On CUDA the compiled
    step is also captured as a CUDA graph per cache (SEPTET_CUDA_GRAPHS=0 turns that off).
    """

    MAX_GRAPHS = 4  # each holds a private memory pool for its intermediates

    def __init__(self, model: DecoderLM):
        self.model = model
        self._fn: Callable | None = None
        self._graphs: dict[tuple, _Graph] = {}
        self.cuda_graphs = env.cuda_graphs_enabled()

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None,
             cache: KVCache) -> torch.Tensor:
        if key_mask is None:  # every slot is a real key (the filled ones are chosen in _step)
            key_mask = torch.ones(tokens.shape[0], cache.max_len, dtype=torch.bool, device=tokens.device)
        if self._fn is None:
            if tokens.device.type == "cpu":
                kernels.enabled()  # decide (and build) before tracing: see kernels.enabled
            # dynamic=False: shapes never change between steps, so nothing is symbolic
            self._fn = torch.compile(_step, dynamic=False, fullgraph=True)
        if tokens.device.type == "cuda" and self.cuda_graphs:
            key = _graph_key(tokens, key_mask, cache)
            graph = self._graphs.get(key)
            if graph is None:
                if len(self._graphs) >= self.MAX_GRAPHS:
                    self._graphs.pop(next(iter(self._graphs)))
                graph = self._graphs[key] = _Graph(self._fn, self.model, tokens, positions, key_mask, cache)
            logits = graph(tokens, positions, key_mask, cache.pos)
        else:
            slot = torch.tensor([cache.pos], device=tokens.device)
            # standard strides: a column sliced from a batch, (B, 1) with stride (T, 1), counts
            # as contiguous but is a new guard, hence a recompilation, for every T
            std = torch.contiguous_format
            logits = self._fn(self.model, tokens.clone(memory_format=std), positions.clone(memory_format=std),
                              key_mask, cache.k, cache.v, slot)
        cache.advance(1)
        return logits


_DECODERS: "weakref.WeakKeyDictionary[DecoderLM, StaticDecoder]" = weakref.WeakKeyDictionary()


def static_decoder(model: DecoderLM) -> StaticDecoder:
    """The model's StaticDecoder, made once per model (its compiled graphs are reused by
    every later generation) and dropped with the model."""
    dec = _DECODERS.get(model)
    if dec is None:
        dec = _DECODERS[model] = StaticDecoder(model)
    return dec
