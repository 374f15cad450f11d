"""Weight-only int8 / int4 linear layers.

Two kernel sets: septet's own (septet.kernels: GGML's Q4_1 / Q8_0 blocks of 32; fp32
activations, or with the "-a8" modes int8 ones, llama.cpp's arithmetic; `Q4Linear` /
`Q8Linear`), used wherever they build and the blocks fit (`septet_kernels`), and PyTorch's
(`Int8Linear` / `Int4Linear` below, SEPTET_KERNELS=0; bf16 activations), described here.

Decoding one token reads every weight once and does ~2 FLOPs per weight, so on a CPU
its speed is set by how many bytes the weights take. Weight-only quantisation keeps the
activations in float and stores the matrices in 8 or 4 bits:

- int8: symmetric, one fp scale per output row; `aten._weight_int8pack_mm`.
- int4: asymmetric, a scale and a zero point per group of `group_size` inputs (the same
  scheme as GGUF's Q4_1, so a model read from a Q4_1 file re-quantises without loss at
  group 32); `aten._convert_weight_to_int4pack_for_cpu` packs the nibbles once, and
  `aten._weight_int4pack_mm_for_cpu` multiplies. The packed bytes are the only copy: the
  prefill path expands them to bf16 itself (`Int4Linear.dequantize`).

`quantize_model` swaps every nn.Linear (after `optimize_for_inference` has packed q/k/v
and gate/up) for one of these, and gives a tied output head its own quantised copy of
the embedding, leaving the embedding lookup itself exact.

The output head is where quantisation shows: its logits are what top-1 and sampling
read, and the kernels round them to bf16 (steps of 0.0625 at |logit| 8-16, 0.125 at 16-32)
on top of the int8 weights' error. So the head is a `RefinedHead`: the quantised matmul ranks the
whole vocabulary, then the `top` best logits of each row are recomputed in fp32 from the
float rows (a tied head's own embedding, which the model keeps anyway). Measured on
SmolLM2 against llama.cpp (tools/int4_parity.py, 829 positions): the int8 head cost 3.5
points of top-1 agreement (0.918 vs 0.953 with an exact head; ~2.3 from the per-row int8
weights, ~1.2 from the bf16 logits); refined, the int4 model agrees 0.953 like fp32
septet and transformers (0.949 vs fp32's 0.9527 averaged over near-tie jitter: what is
left is the body's bf16 activations, outputs and scales), for ~0.4 ms a token (eager).

`quant_load.QuantizeOnLoad` does the same while a checkpoint is read: it takes the tensors one at a
time (`checkpoints.convert.load_any(..., sink=...)`) and quantises each transformer block
as soon as its weights are in, so the whole float model never exists at once (peak
memory); the result is the model `quantize_model` makes from the loaded float model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .errors import ConfigError
from .refined_head import REFINE_TOP, RefinedHead

# "-a8": activations quantised to int8 per block of 32 as well (llama.cpp's arithmetic for
# Q8_0 / Q4_1 weights; septet's kernels only). Without it the activations stay float.
MODES = ("int8", "int4", "int8-a8", "int4-a8")


def weight_mode(mode: str) -> str:
    """"int4-a8" -> "int4": the weights' format, whatever the activations."""
    return mode.removesuffix("-a8")
INT4_GROUP_SIZES = (32, 64, 128, 256)


def _check_ops(mode: str) -> None:
    name = "_weight_int8pack_mm" if mode == "int8" else "_weight_int4pack_mm_for_cpu"
    if not hasattr(torch.ops.aten, name):
        raise ConfigError(f"--quant {mode}: this PyTorch ({torch.__version__}) has no aten.{name} kernel")


# Measured on this project's CPU (AVX-512/AMX, torch 2.13): both kernels are fast only with
# bf16 activations (fp32 ones take a slow reference path, ~10x slower), and only for a few
# rows: from ~32 rows (a prefill) dequantising to bf16 and using the dense bf16 matmul
# (AMX) wins by ~10x. So activations run through these layers in bf16.
COMPUTE_DTYPE = torch.bfloat16
DEQUANT_MIN_ROWS = 32
# quantise big matrices this many rows at a time: fp32 temporaries stay ~2 MB at d=576
_ROWS_PER_BLOCK = 1024


class _QuantLinear(nn.Module):
    """A weight-only quantised layer: `_kernel` for a few rows (decoding), the dequantised
    weight and a dense matmul for many (`_dense`)."""

    out_features: int
    in_features: int
    kernel_dtype = COMPUTE_DTYPE  # what `_kernel` takes and returns

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The (N, K) weight this layer multiplies by, in the compute dtype."""
        raise NotImplementedError

    def _dense(self, x2: torch.Tensor) -> bool:
        return x2.shape[0] >= DEQUANT_MIN_ROWS

    def _dense_dtype(self, x2: torch.Tensor) -> torch.dtype:
        return COMPUTE_DTYPE

    def _dense_matmul(self, x2: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return torch.nn.functional.linear(x2.to(dt), self.dequantize().to(dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._dense(x2):
            y = self._dense_matmul(x2, self._dense_dtype(x2))
        else:
            y = self._kernel(x2.to(self.kernel_dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)


class Int8Linear(_QuantLinear):
    """y = x · (q · s)ᵀ + b with q (N, K) int8 and one scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q = torch.empty(weight.shape, dtype=torch.int8)
        scale = torch.empty(weight.shape[0])
        # in row blocks (_ROWS_PER_BLOCK): a whole fp32 copy of a 49k x 576 head would
        # briefly cost ~0.3 GB
        for r in range(0, weight.shape[0], _ROWS_PER_BLOCK):
            w = weight[r:r + _ROWS_PER_BLOCK].detach().float()
            s = (torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_()) / 127.0).clamp_(min=1e-12)  # max |w|
            q[r:r + _ROWS_PER_BLOCK] = w.div(s[:, None]).round_().clamp_(-127, 127)
            scale[r:r + _ROWS_PER_BLOCK] = s
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(COMPUTE_DTYPE))
        self.register_buffer("bias", None if bias is None else bias.detach().to(COMPUTE_DTYPE))

    def dequantize(self) -> torch.Tensor:
        # int8 x bf16 promotes to bf16 in one pass (|q| <= 127 is exact in bf16)
        return torch.mul(self.qweight, self.scale[:, None])

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Weight rows `idx` (...,) -> (..., K) fp32, exact (for a refined head)."""
        return self.qweight[idx].float() * self.scale[idx].float()[..., None]

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _unpack_int4(packed: torch.Tensor, N: int, K: int, bn: int, half: bool) -> torch.Tensor:
    """The (N, K) int32 nibbles in `packed` (torch's CPU int4pack layout `bn`, `half`; see
    `_int4_layout`). For tests and the layout probe; the forward pass never unpacks."""
    out = torch.empty(K, N, dtype=torch.int32)
    for n0, n1, size, h in _int4_segments(N, bn, half):
        p = packed[n0:n1].reshape((n1 - n0) // size, K, size // 2).transpose(0, 1)  # (K, nb, size/2)
        o = out[:, n0:n1].view(K, (n1 - n0) // size, *((2, size // 2) if h else (size // 2, 2)))
        lo, hi = (o[:, :, 0], o[:, :, 1]) if h else (o[..., 0], o[..., 1])
        lo.copy_(p & 15)
        hi.copy_(p >> 4)
    return out.t().contiguous()


def _int4_segments(N: int, bn: int, half: bool) -> list[tuple[int, int, int, bool]]:
    """Row ranges of one packing pattern: (n0, n1, block rows, half). Full blocks of `bn`
    rows, then one shorter block that torch always packs in row pairs."""
    full = N // bn * bn
    segs = [(0, full, bn, half)] if full else []
    if N > full:
        segs.append((full, N, N - full, False))
    return segs


@functools.lru_cache(maxsize=None)
def _int4_layout() -> tuple[int, bool] | None:
    """How `aten._convert_weight_to_int4pack_for_cpu` lays out nibbles on this machine.

    It depends on the CPU kernels torch dispatches to (AVX-512, AVX2, plain): rows go in
    blocks of `bn` (64 / 32 / ...); block b keeps, for each input k, bn/2 bytes whose byte j
    holds rows (j, j + bn/2) as (low, high) nibble when `half`, rows (2j, 2j+1) otherwise;
    a last block shorter than bn always uses row pairs. Probed once by packing a random
    matrix; None when no known layout reproduces it (Int4Linear then keeps its own
    plain copy of the nibbles for the prefill path)."""
    g = torch.Generator().manual_seed(0)
    for bn in (64, 32, 16):
        N, K = 2 * bn + 16, 64  # two full blocks and a short one
        q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        except (RuntimeError, AttributeError):
            return None
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (N, K // 2):
            return None
        for half in (True, False):
            if torch.equal(_unpack_int4(packed, N, K, bn, half), q):
                return bn, half
    return None


class Int4Linear(_QuantLinear):
    """y = x · Wᵀ + b with W[n, g·G:(g+1)·G] = q · scale[g, n] + min[g, n], q in 0..15.

    Keeps the nibbles once, packed for torch's kernel (few rows). For many rows (prefill)
    `dequantize` expands that same packed form to a bf16 weight: the packing is only a
    fixed interleave of rows (`_int4_layout`), so no second, plain copy is needed."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32):
        super().__init__()
        N, K = weight.shape
        if group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"int4 group size {group_size} is not supported; use one of "
                              f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        if K % group_size or N % 16:
            raise ConfigError(f"int4 needs in_features divisible by the group size {group_size} "
                              f"and out_features by 16; a ({N}, {K}) weight is not; use int8 or "
                              "another group size")
        self.out_features, self.in_features, self.group_size = N, K, group_size
        self._layout = _int4_layout()
        packed = torch.empty(N, K // 2, dtype=torch.uint8)
        sz = torch.empty(K // group_size, N, 2, dtype=COMPUTE_DTYPE)
        plain = None if self._layout is not None else torch.empty(N, K // 2, dtype=torch.uint8)
        # in row blocks (a multiple of every packing block, so the bytes are those of one
        # call on the whole matrix): a 4-bit 49k x 576 head would otherwise briefly hold
        # ~0.3 GB of fp32 and int32 temporaries
        for r in range(0, N, _ROWS_PER_BLOCK):
            rows = slice(r, min(N, r + _ROWS_PER_BLOCK))
            w = weight[rows].detach().float().view(-1, K // group_size, group_size)
            lo, hi = w.amin(-1), w.amax(-1)  # (n, G)
            scale = ((hi - lo) / 15.0).clamp_(min=1e-12)
            q = w.sub(lo[..., None]).div_(scale[..., None]).round_().clamp_(0, 15)
            q = q.to(torch.int32).view(-1, K)
            del w
            packed[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            # torch's kernel computes (q − 8)·scale + zero, so its zero is the group's midpoint
            sz[:, rows, 0] = scale.t().to(COMPUTE_DTYPE)
            sz[:, rows, 1] = (lo + 8.0 * scale).t().to(COMPUTE_DTYPE)
            if plain is not None:
                q8 = q.to(torch.uint8)
                plain[rows] = q8[:, 0::2] | (q8[:, 1::2] << 4)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_zeros", sz)
        if plain is not None:
            self.register_buffer("nibbles", plain)  # (N, K/2), low nibble first
        self.register_buffer("bias", None if bias is None else bias.detach().to(COMPUTE_DTYPE))

    def dequantize(self) -> torch.Tensor:
        """(N, K) bf16, as a transposed view of a (K, N) matrix: expanding the packed
        nibbles along N keeps their runs contiguous, and the scales broadcast over inputs.
        Each weight is (q − 8)·scale + zero in fp32, rounded once to bf16, as the kernel
        computes it."""
        N, K, G = self.out_features, self.in_features, self.group_size
        # (K/G, N) each, contiguous (strided operands make addcmul ~2x slower)
        scale = self.scales_zeros[..., 0].float()
        low = self.scales_zeros[..., 1].float() - 8.0 * scale  # the weight at q = 0
        if self._layout is None:
            b = self.nibbles
            q = torch.stack((b & 15, b >> 4), dim=-1).view(N, K // G, G)
            out = torch.empty(N, K // G, G, dtype=COMPUTE_DTYPE)
            torch.addcmul(low.t()[..., None], q, scale.t()[..., None], out=out)
            return out.view(N, K)
        bn, half = self._layout
        out = torch.empty(K, N, dtype=COMPUTE_DTYPE)
        for n0, n1, size, h in _int4_segments(N, bn, half):
            nb = (n1 - n0) // size
            # packed rows n0..n1 are nb blocks of (K, size/2) bytes
            p = self.qweight[n0:n1].reshape(nb, K // G, G, size // 2).permute(1, 2, 0, 3)
            split = (nb, 2, size // 2) if h else (nb, size // 2, 2)
            o = out[:, n0:n1].view(K // G, G, *split)
            s = scale[:, n0:n1].reshape(K // G, 1, *split)
            z = low[:, n0:n1].reshape(K // G, 1, *split)
            for nib, q in enumerate((p & 15, p >> 4)):
                pick = (slice(None),) * 3 + ((nib, slice(None)) if h else (slice(None), nib))
                torch.addcmul(z[pick], q, s[pick], out=o[pick])
        return out.t()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size,
                                                          self.scales_zeros)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4, group_size={self.group_size}")


def septet_kernels(mode: str, group_size: int, in_features: int) -> bool:
    """Whether a `mode` layer uses septet's own kernels (septet.kernels: Q4_1 / Q8_0 blocks of
    32, docs/benchmarks.md) rather than torch's: when they are available here (SEPTET_KERNELS=0
    selects torch's, e.g. to compare the two) and the blocks fit (int4 groups of 32)."""
    if in_features % 32:
        return False
    if weight_mode(mode) == "int4" and group_size != 32:
        return False
    from . import kernels

    return kernels.available()


def quantize_linear(layer: nn.Linear | torch.Tensor, mode: str, group_size: int = 32) -> nn.Module:
    """An int8 / int4 layer computing what `layer` (or a bare (N, K) weight) does: septet's
    Q8Linear / Q4Linear where `septet_kernels` allows, else Int8Linear / Int4Linear (which
    have no int8-activation arithmetic: "-a8" modes need septet's kernels)."""
    if mode not in MODES:
        raise ConfigError(f"quantisation {mode!r} is not one of {', '.join(MODES)}")
    if isinstance(layer, nn.Linear):
        weight, bias = layer.weight, layer.bias
    else:
        weight, bias = layer, None
    wmode, a8 = weight_mode(mode), mode.endswith("-a8")
    if septet_kernels(mode, group_size, weight.shape[1]):
        from .kernels.linear import Q4Linear, Q8Linear

        cls = Q8Linear if wmode == "int8" else Q4Linear
        return cls(weight, bias, int8_act=a8)
    if a8:
        from . import kernels

        why = kernels.why_not() or f"a ({weight.shape[0]}, {weight.shape[1]}) weight is not in blocks of 32"
        raise ConfigError(f"--quant {mode} needs septet's kernels, which are not usable here ({why}); "
                          f"use --quant {wmode}")
    _check_ops(wmode)
    if wmode == "int8":
        return Int8Linear(weight, bias)
    return Int4Linear(weight, bias, group_size=group_size)


def _check_modes(mode: str, head: str | None) -> str:
    """The head's mode, after checking both modes. The head's activations follow the
    model's: `head` "int8" under mode "int4-a8" is "int8-a8" (llama.cpp's arithmetic throughout)."""
    head_mode = head or mode
    if mode.endswith("-a8") and not head_mode.endswith("-a8"):
        head_mode += "-a8"
    if mode not in MODES:
        raise ConfigError(f"quantisation {mode!r} is not one of {', '.join(MODES)}")
    if head_mode not in MODES:
        raise ConfigError(f"head quantisation {head_mode!r} is not one of {', '.join(MODES)}")
    return head_mode


def _quantize_head(layer: nn.Linear, head_mode: str, group_size: int, refine: int) -> nn.Module:
    """An untied output head: quantised, and refined from its own int8 rows (see
    RefinedHead; an int4 head has no cheap float rows, so it is left as it is)."""
    fast = quantize_linear(layer, head_mode, group_size)
    if refine and hasattr(fast, "rows"):  # int8 rows
        return RefinedHead(fast, None, top=refine)
    return fast


def _quantize_linears(model: nn.Module, root: nn.Module, mode: str, head_mode: str,
                      group_size: int, refine: int) -> None:
    """Replace every nn.Linear inside `root` (a part of `model`) by its quantised form; the
    model's own `lm_head` gets `head_mode` (and `refine`)."""
    # names, not modules: holding every float layer until the loop ends would keep the
    # whole unquantised part alive next to the quantised one (peak memory)
    targets = [(parent, name) for parent in root.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name in targets:
        layer = getattr(parent, name)
        if parent is model and name == "lm_head":
            setattr(parent, name, _quantize_head(layer, head_mode, group_size, refine))
        else:
            setattr(parent, name, quantize_linear(layer, mode, group_size))


def _quantize_tied_head(model: nn.Module, head_mode: str, group_size: int, refine: int) -> None:
    """A tied head: quantise a copy of the embedding for the output matmul only, whose top
    logits are then recomputed from the embedding itself (RefinedHead).

    When the quantised copy holds the embedding exactly (a GGUF's Q8_0 token table, which
    re-quantises to itself in Q8_0 blocks), the float table carries nothing more: the
    lookup reads the blocks too (`BlockEmbedding`) and the float copy is dropped (113 MB
    of SmolLM2's fp32 model), the refinement reading the same exact rows."""
    if getattr(model, "lm_head", None) is None and hasattr(model, "tok_emb"):
        w = model.tok_emb.weight.detach()
        scale = model.config.d_model ** -0.5 if model.config.family == "palm" else 1.0
        fast = quantize_linear(w * scale if scale != 1.0 else w, head_mode, group_size)
        if scale == 1.0 and _holds_exactly(fast, w):
            model.tok_emb = BlockEmbedding(fast, w.dtype)
            top = 0 if w.dtype == torch.float32 and _exact_logits(fast) else refine
            model.quant_head = RefinedHead(fast, None, top=top) if top else fast
            return
        model.quant_head = RefinedHead(fast, model.tok_emb, scale=scale, top=refine) if refine else fast


def _exact_logits(layer: nn.Module) -> bool:
    """Whether a head's logits are already the fp32 products of its own exact rows (septet's
    Q8_0 kernels with fp32 activations, fed fp32), so that recomputing its top rows from
    those rows (RefinedHead) would give the same numbers, up to summation order."""
    return hasattr(layer, "rows") and getattr(layer, "int8_act", True) is False


def _holds_exactly(layer: nn.Module, w: torch.Tensor, chunk: int = 256) -> bool:
    """Whether `layer`'s exact rows (int8 layers have them) equal the float weight `w`."""
    if not hasattr(layer, "rows"):
        return False
    for r in range(0, w.shape[0], chunk):
        idx = torch.arange(r, min(r + chunk, w.shape[0]))
        if not torch.equal(layer.rows(idx), w[idx].float()):
            return False
    return True


class BlockEmbedding(nn.Module):
    """A token embedding read from a quantised layer's exact rows (see _quantize_tied_head);
    the layer stays registered where it is (the head), not here."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        self._layer = (layer,)
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = layer.out_features, layer.in_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._layer[0].rows(tokens).to(self.dtype)  # (..., C)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantised head"


def quantize_model(model: nn.Module, mode: str, *, group_size: int = 32,
                   head: str | None = "int8", refine: int = REFINE_TOP) -> nn.Module:
    """Replace the model's linear layers (and a tied head) by weight-only `mode` layers, in place.

    `head` is the mode of the output head (tied or not); by default int8, as GGUF files keep
    the embedding at Q8_0 (with int8 activations when `mode` has them). None: the same as `mode`. `refine`: how many of each row's best
    logits the head recomputes in fp32 from float rows (RefinedHead; 0: none). Unrefined,
    the int8 head costs SmolLM2 3.5 points of top-1 agreement with llama.cpp and a 4-bit
    one ~14; refined, both match fp32's top-1, but a 4-bit head's other logits stay ~7x
    further from fp32 (KL) than an int8 one's, so int8 remains the default.
    The model becomes inference-only (its state_dict changes). Returns the model.
    """
    head_mode = _check_modes(mode, head)
    from .generate import optimize_for_inference

    optimize_for_inference(model)
    p = next(model.parameters())
    if p.device.type != "cpu":
        raise ConfigError(f"--quant {mode} uses PyTorch's CPU kernels; load the model on the CPU")
    _quantize_linears(model, model, mode, head_mode, group_size, refine)
    _quantize_tied_head(model, head_mode, group_size, refine)
    model._quant = mode
    return model


__all__ = ["BlockEmbedding", "Int8Linear", "Int4Linear", "RefinedHead", "quantize_linear", "quantize_model",
           "MODES", "REFINE_TOP"]
