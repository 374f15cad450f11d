"""GGUF files (llama.cpp's single-file checkpoints): a bounds-checked reader and a loader
into septet's own models.

A GGUF is untrusted input. `read_gguf` parses the header itself, checking every length,
count and offset against the file size before using it, so a truncated, random or hostile
file fails fast with one `CheckpointError` line instead of a hang, a MemoryError or a numpy
traceback. Tensor data is only touched by `load_gguf`, one tensor at a time.

Layout facts the loader relies on:
- GGUF lists tensor dimensions fastest-first (ggml order); torch's shape is the reverse.
- llama.cpp's converter permutes the rows of Q and K of every head from HF's 'half' RoPE
  layout (pairs (i, i + D/2)) to the interleaved one (pairs (2i, 2i+1)). septet uses the HF
  layout, so `_unpermute_qk` undoes it per head (Q with n_head heads, K with n_kv_head).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..generation_config import from_gguf_metadata
from ..models import build_on_meta
from . import Loaded

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
FIX = "re-download it (`septet fetch smollm2` for the bundled model)"

# ggml type id -> (name, elements per block, bytes per block). Fixed by the format.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
# what `dequantize` turns into floats (plain floats natively, block formats via gguf.quants)
_FLOAT_NATIVE = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
_QUANTS = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
           "IQ4_NL", "IQ4_XS"}
SUPPORTED_TYPES = tuple(sorted({"BF16", *_FLOAT_NATIVE, *_QUANTS}))

# metadata value types: id -> (struct code, size); 8 = string, 9 = array
_SCALAR = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
           6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
       10: "<u8", 11: "<i8", 12: "<f8"}
_MAX_KEY = 1 << 16
_MAX_DIMS = 4
_MAX_ARRAY_DEPTH = 2


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    type_name: str
    shape: tuple[int, ...]  # torch order (slowest first): the reverse of the file's dims
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFInfo:
    path: Path
    version: int
    alignment: int
    data_offset: int  # absolute offset of the tensor data section
    file_size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # in file order


class _Bad(Exception):
    """Internal: a structural problem; turned into a CheckpointError naming the file."""


class _Cursor:
    def __init__(self, buf: Any, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Bad(f"truncated: {what} needs {n} bytes at offset {self.pos} but the file is {self.size} bytes")

    def scalar(self, code: str, n: int, what: str) -> Any:
        self.need(n, what)
        (v,) = struct.unpack_from(code, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise _Bad(f"{what} claims {n} bytes (limit {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} at offset {self.pos - n} is not valid UTF-8") from None

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row (a vocabulary): one tight loop, messages only on error."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.need(n, f"{what}[{i}]")
            try:
                append(str(buf[pos:pos + n], "utf-8"))
            except UnicodeDecodeError:
                raise _Bad(f"{what}[{i}] at offset {pos} is not valid UTF-8") from None
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            code, n = _SCALAR[vtype]
            v = self.scalar(code, n, what)
            # a float32 scalar as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)
            return float(str(np.float32(v))) if vtype == 6 else v
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            if depth >= _MAX_ARRAY_DEPTH:
                raise _Bad(f"{what}: arrays nested deeper than {_MAX_ARRAY_DEPTH}")
            etype = self.u32(f"element type of {what}")
            count = self.u64(f"length of {what}")
            left = self.size - self.pos
            if etype in _SCALAR:
                n = _SCALAR[etype][1]
                if count > left // n:
                    raise _Bad(f"{what} claims {count} elements of {n} bytes, more than the {left} bytes left")
                arr = np.frombuffer(self.buf, dtype=_NP[etype], count=count, offset=self.pos)
                self.pos += count * n
                out = arr.tolist()
                del arr
                return [bool(x) for x in out] if etype == 7 else out
            if etype == 8:
                if count > left // 8:
                    raise _Bad(f"{what} claims {count} elements, more than the {left} bytes left can hold")
                return self.strings(count, what)
            if etype in (8, 9):
                min_size = 8 if etype == 8 else 12
                if count > left // min_size:
                    raise _Bad(f"{what} claims {count} elements, more than the {left} bytes left can hold")
                return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]
            raise _Bad(f"{what}: unknown array element type {etype}")
        raise _Bad(f"{what}: unknown value type {vtype}")


def _err(path: Path, msg: str) -> CheckpointError:
    return CheckpointError(f"GGUF file '{path}': {msg}; {FIX}")


def read_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Parse and validate a GGUF header: metadata (plain Python values) and tensor infos."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise _err(path, f"file is {size} bytes, too short for a GGUF header (24 bytes)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise CheckpointError(
            f"GGUF file '{path}' does not exist; check the path or run `septet fetch smollm2`"
        ) from None
    except IsADirectoryError:
        raise CheckpointError(f"GGUF path '{path}' is a directory; pass the .gguf file inside it") from None
    except OSError as e:
        raise CheckpointError(f"GGUF file '{path}' cannot be read ({e.strerror or e}); check permissions") from None
    try:
        return _parse(path, mm, size)
    except _Bad as e:
        raise _err(path, str(e)) from None
    finally:
        try:
            mm.close()
        except BufferError:  # a numpy view still alive; the GC closes it
            pass


def _parse(path: Path, mm: Any, size: int) -> GGUFInfo:
    c = _Cursor(mm, size)
    magic = bytes(mm[:4])
    if magic != GGUF_MAGIC:
        raise _Bad(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    c.pos = 4
    version = c.u32("version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and version >> 16:
            raise _Bad(f"big-endian GGUF (version field {version:#x}) is not supported")
        raise _Bad(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    # each kv takes >= 8 (key len) + 4 (type) + 1 bytes; each tensor info >= 8 + 4 + 8 + 4 + 8
    left = size - c.pos
    if n_kv > left // 13:
        raise _Bad(f"truncated or corrupt: header claims {n_kv} metadata entries, "
                   f"more than a {size}-byte file can hold")
    if n_tensors > left // 32:
        raise _Bad(f"truncated or corrupt: header claims {n_tensors} tensors, more than a {size}-byte file can hold")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", _MAX_KEY)
        if key in meta:
            raise _Bad(f"metadata key '{key}' appears twice")
        vtype = c.u32(f"type of metadata '{key}'")
        meta[key] = c.value(vtype, f"metadata '{key}'")
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment & (alignment - 1) or alignment > (1 << 20):
        raise _Bad(f"metadata 'general.alignment' is {alignment!r}; expected a power of two")
    infos: list[tuple[str, int, tuple[int, ...], int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"name of tensor #{i}", _MAX_KEY)
        if name in names:
            raise _Bad(f"tensor '{name}' appears twice")
        names.add(name)
        n_dims = c.u32(f"dimension count of tensor '{name}'")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Bad(f"tensor '{name}' has {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
        dims = tuple(c.u64(f"dimension {d} of tensor '{name}'") for d in range(n_dims))
        gtype = c.u32(f"type of tensor '{name}'")
        offset = c.u64(f"offset of tensor '{name}'")
        if gtype not in GGML_TYPES:
            raise _Bad(f"tensor '{name}' has unknown ggml type {gtype}")
        if any(d == 0 for d in dims):
            raise _Bad(f"tensor '{name}' has a zero dimension {list(dims)}")
        tname, block, tsize = GGML_TYPES[gtype]
        if dims[0] % block:
            raise _Bad(f"tensor '{name}' ({tname}) has a first dimension {dims[0]} "
                       f"that is not a multiple of its block size {block}")
        n = 1
        for d in dims:
            n *= d
            if n > size * 256:  # cannot possibly fit, even at the densest quantisation
                raise _Bad(f"tensor '{name}' claims shape {list(dims)}, larger than the file")
        infos.append((name, gtype, dims, offset, n // block * tsize))
    data_offset = -(-c.pos // alignment) * alignment
    if data_offset > size and infos:
        raise _Bad(f"truncated: tensor data would start at offset {data_offset} but the file is {size} bytes")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, gtype, dims, offset, nbytes in infos:
        tname = GGML_TYPES[gtype][0]
        if offset % alignment:
            raise _Bad(f"tensor '{name}' offset {offset} is not aligned to {alignment} bytes")
        start = data_offset + offset
        if start + nbytes > size:
            raise _Bad(f"truncated: tensor '{name}' needs bytes {start}..{start + nbytes} "
                       f"but the file is {size} bytes")
        tensors[name] = TensorInfo(name, gtype, tname, tuple(reversed(dims)), start, nbytes)
        spans.append((start, start + nbytes, name))
    spans.sort()
    for (_s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise _Bad(f"tensors '{n0}' and '{n1}' overlap in the file")
    return GGUFInfo(path=path, version=version, alignment=alignment, data_offset=data_offset,
                    file_size=size, metadata=meta, tensors=tensors)


# ------------------------------------------------------------------------------ tensors


def _halves(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian fp16 at byte `at` of every block, as fp32 (nb, 1)."""
    return blocks[:, at:at + 2].copy().view("<f2").astype(np.float32)


# numpy, vectorised over chunks of blocks (faster than torch's uint8 ops, and than the gguf
# package, which loops over row groups in Python; docs/benchmarks.md). Each writes the values
# of `blocks` (nb, block bytes) into `out` (nb, 32) float32.
def _dequant_q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    # block of 32: fp16 d, fp16 m, 16 bytes; value j = (lo nibble j)·d + m, j+16 = (hi nibble j)·d + m
    qs = blocks[:, 4:]
    out[:, :16] = qs & 15
    out[:, 16:] = qs >> 4
    out *= _halves(blocks, 0)
    out += _halves(blocks, 2)


def _dequant_q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # block of 32: fp16 d, 16 bytes; value = (nibble − 8)·d, low nibbles first
    qs = blocks[:, 2:]
    out[:, :16] = qs & 15
    out[:, 16:] = qs >> 4
    out -= 8
    out *= _halves(blocks, 0)


def _dequant_q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # block of 32: fp16 d, 32 int8; value = q·d
    out[:] = blocks[:, 2:].view(np.int8)
    out *= _halves(blocks, 0)


# type -> (function, bytes per block of 32 values)
_FAST_QUANTS = {"Q4_0": (_dequant_q4_0, 18), "Q4_1": (_dequant_q4_1, 20), "Q8_0": (_dequant_q8_0, 34)}
# blocks per chunk: temporaries stay a few MB whatever the tensor's size (a whole-tensor
# pass would briefly hold ~2x a 113 MB fp32 embedding more), and chunks stay in cache
_CHUNK_BLOCKS = 1 << 14


def _dequant_fast(buf: np.ndarray, type_name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    fn, nbytes = _FAST_QUANTS[type_name]
    blocks = buf.reshape(-1, nbytes)
    nb = blocks.shape[0]
    if dtype == torch.float32:
        out = np.empty((nb, 32), dtype=np.float32)
        for i in range(0, nb, _CHUNK_BLOCKS):
            fn(blocks[i:i + _CHUNK_BLOCKS], out[i:i + _CHUNK_BLOCKS])
        return torch.from_numpy(out).reshape(shape)
    # another dtype: fp32 one chunk at a time, rounded into the output (as fp32 then .to)
    res = torch.empty(nb, 32, dtype=dtype)
    scratch = np.empty((min(nb, _CHUNK_BLOCKS), 32), dtype=np.float32)
    for i in range(0, nb, _CHUNK_BLOCKS):
        part = blocks[i:i + _CHUNK_BLOCKS]
        tmp = scratch[:len(part)]
        fn(part, tmp)
        res[i:i + len(part)] = torch.from_numpy(tmp)
    return res.reshape(shape)


def q8_0_blocks(raw: bytes, t: TensorInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor's raw bytes -> its blocks as they are: qs (N, K/32, 32) int8 and
    d (N, K/32) fp16 (for a sink that keeps them: `load_gguf`'s `takes_blocks`)."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(t.shape[0], t.shape[-1] // 32, 34)
    d = torch.from_numpy(blocks[..., :2].copy().view("<f2")[..., 0]).to(torch.float16)
    qs = torch.from_numpy(blocks[..., 2:].copy().view(np.int8))
    return qs, d


def dequantize(raw: bytes | np.ndarray, t: TensorInfo, dtype: torch.dtype = torch.float32,
               *, source: str | Path = "") -> torch.Tensor:
    """Raw bytes of tensor `t` -> a torch tensor of `t.shape` in `dtype` (block formats are
    dequantised in fp32, then rounded to `dtype`)."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size != t.nbytes:
        raise CheckpointError(
            f"GGUF file '{source}': tensor '{t.name}' has {buf.size} bytes, expected {t.nbytes}; {FIX}"
        )
    if t.type_name in _FLOAT_NATIVE:
        arr = buf.view(_FLOAT_NATIVE[t.type_name])
        out = torch.from_numpy(arr.copy())
    elif t.type_name == "BF16":
        out = torch.from_numpy(buf.view("<i2").copy()).view(torch.bfloat16)
    elif t.type_name in _FAST_QUANTS:  # vectorised, chunk by chunk
        return _dequant_fast(buf, t.type_name, t.shape, dtype)
    elif t.type_name in _QUANTS:
        from gguf import quants
        from gguf.constants import GGMLQuantizationType

        _, block, tsize = GGML_TYPES[t.ggml_type]
        row = t.shape[-1] // block * tsize
        try:
            arr = quants.dequantize(buf.reshape(-1, row), GGMLQuantizationType(t.ggml_type))
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"GGUF file '{source}': tensor '{t.name}' of type {t.type_name} "
                                  f"could not be dequantized ({e})") from None
        out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        raise CheckpointError(
            f"GGUF file '{source}': tensor '{t.name}' has type {t.type_name}, which septet cannot "
            f"dequantize yet (supported: {', '.join(SUPPORTED_TYPES)}); convert the file with llama.cpp's "
            "llama-quantize to e.g. Q8_0 or Q4_K_M")
    return out.reshape(t.shape).to(dtype)


def read_tensor(info: GGUFInfo, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = info.tensors[name]
    with open(info.path, "rb") as f:
        raw = os.pread(f.fileno(), t.nbytes, t.offset)
    if len(raw) != t.nbytes:
        raise _err(info.path, f"tensor '{name}' is truncated (file changed while reading?)")
    return dequantize(raw, t, dtype, source=info.path)


# ------------------------------------------------------------------------------ llama


def _unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a Q/K weight (out, in): within each head, GGUF row
    2i+j holds HF row j·D/2 + i (j ∈ {0, 1}, i < D/2)."""
    out = w.shape[0]
    d_half = out // n_heads // 2
    return w.reshape(n_heads, d_half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's convert permutation (HF 'half' layout -> GGUF interleaved), for writing/tests."""
    out = w.shape[0]
    d_half = out // n_heads // 2
    return w.reshape(n_heads, 2, d_half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_LAYER_MAP = {
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
}
_TOP_MAP = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "norm_f.weight",
            "output.weight": "lm_head.weight"}


def septet_name(gguf_name: str) -> str | None:
    """The septet parameter name of a llama-architecture GGUF tensor, or None if unknown."""
    if gguf_name in _TOP_MAP:
        return _TOP_MAP[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_MAP:
        return f"blocks.{int(parts[1])}.{_LAYER_MAP[parts[2]]}"
    return None


def _meta_int(info: GGUFInfo, key: str, default: int | None = None) -> int:
    v = info.metadata.get(key, default)
    if v is None:
        raise _err(info.path, f"metadata '{key}' is missing")
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v > (1 << 31):
        raise _err(info.path, f"metadata '{key}' is {v!r}; expected a positive integer")
    return v


def _meta_float(info: GGUFInfo, key: str, default: float) -> float:
    v = info.metadata.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < float(v) < float("inf")):
        raise _err(info.path, f"metadata '{key}' is {v!r}; expected a positive number")
    return float(v)


def llama_config(info: GGUFInfo):
    from ..models.llama import LLaMAConfig

    a = "llama"
    if "token_embd.weight" not in info.tensors:
        raise _err(info.path, "tensor 'token_embd.weight' is missing")
    emb = info.tensors["token_embd.weight"]
    if len(emb.shape) != 2:
        raise _err(info.path, f"tensor 'token_embd.weight' has shape {list(emb.shape)}; expected 2 dimensions")
    vocab, d_model = emb.shape
    tokens = info.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != vocab:
        raise _err(info.path, f"the token list has {len(tokens)} entries but 'token_embd.weight' has {vocab} rows")
    n_embd = _meta_int(info, f"{a}.embedding_length", d_model)
    if n_embd != d_model:
        raise _err(info.path,
                   f"metadata '{a}.embedding_length'={n_embd} disagrees with 'token_embd.weight' width {d_model}")
    n_head = _meta_int(info, f"{a}.attention.head_count")
    n_kv = _meta_int(info, f"{a}.attention.head_count_kv", n_head)
    d_head = _meta_int(info, f"{a}.attention.key_length", d_model // n_head)
    rope_dim = _meta_int(info, f"{a}.rope.dimension_count", d_head)
    if rope_dim != d_head:
        raise _err(info.path, f"metadata '{a}.rope.dimension_count'={rope_dim} differs from the head size {d_head} "
                              "(partial rotary embeddings are not supported yet)")
    scaling = info.metadata.get(f"{a}.rope.scaling.type", "none")
    if scaling not in ("none", "") or "rope_freqs.weight" in info.tensors:
        raise CheckpointError(f"GGUF file '{info.path}': RoPE scaling ({scaling!r} / rope_freqs) is not supported yet; "
                              "use a model without rope scaling")
    from ..errors import ConfigError

    try:
        return LLaMAConfig(
            vocab_size=vocab,
            n_layer=_meta_int(info, f"{a}.block_count"),
            d_model=d_model,
            n_head=n_head,
            n_kv_head=n_kv,
            d_head=d_head,
            d_ff=_meta_int(info, f"{a}.feed_forward_length"),
            context=_meta_int(info, f"{a}.context_length", 2048),
            norm_eps=_meta_float(info, f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=_meta_float(info, f"{a}.rope.freq_base", 10000.0),
            tie_embeddings="output.weight" not in info.tensors,
        )
    except ConfigError as e:
        raise _err(info.path, f"inconsistent model metadata ({e})") from None


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
              tokenizer: bool = True, sink=None) -> Loaded:
    """Load a llama-architecture GGUF into septet names/layouts (dequantized to `dtype`).

    `sink` (see `convert.load_any`): `sink(config)` receives each tensor as soon as it is
    dequantised, instead of the returned state dict (then empty). A sink with a
    `takes_blocks(key, type_name)` method that says yes gets a Q8_0 tensor's blocks instead
    (`q8_0_blocks`; only Q8_0 so far), never dequantised."""
    info = read_gguf(path)
    arch = info.metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF file '{info.path}': metadata 'general.architecture' is {arch!r}; "
                              "septet loads only 'llama' GGUFs so far")
    config = llama_config(info)

    expected = {k: tuple(v.shape) for k, v in build_on_meta(config).state_dict().items()}
    unknown = [n for n in info.tensors if septet_name(n) is None]
    if unknown:
        raise CheckpointError(f"GGUF file '{info.path}': tensor '{unknown[0]}' is not part of a llama model "
                              f"septet knows ({len(unknown)} unknown); this variant is not supported yet")
    for name, t in info.tensors.items():  # all checks before the first tensor is read
        key = septet_name(name)
        if key not in expected:
            raise _err(info.path, f"tensor '{name}' ({key}) does not fit a {config.n_layer}-layer model")
        if t.shape != expected[key]:
            raise _err(info.path, f"tensor '{name}' has shape {list(t.shape)}, expected {list(expected[key])}")
    missing = sorted(set(expected) - {septet_name(n) for n in info.tensors})
    if missing:
        raise _err(info.path, f"tensor for '{missing[0]}' is missing ({len(missing)} missing)")
    state: dict[str, torch.Tensor] = {}
    put = sink(config) if sink is not None else state.__setitem__
    with open(info.path, "rb") as f:
        fd = f.fileno()
        for name, t in info.tensors.items():
            raw = os.pread(fd, t.nbytes, t.offset)
            if len(raw) != t.nbytes:
                raise _err(info.path, f"tensor '{name}' is truncated")
            key = septet_name(name)
            # GGUF stores q and k rows permuted for its RoPE; the others are septet's layout
            heads = config.n_head if name.endswith("attn_q.weight") else (
                config.n_kv_head if name.endswith("attn_k.weight") else None)
            takes = getattr(put, "takes_blocks", None)
            if t.type_name == "Q8_0" and heads is None and takes is not None and takes(key, t.type_name):
                put(key, q8_0_blocks(raw, t))
                continue
            w = dequantize(raw, t, dtype, source=info.path)
            del raw
            if heads is not None:
                w = _unpermute_qk(w, heads)
            put(key, w)
            del w

    tok = chat = bos = None
    eos: tuple[int, ...] = ()
    add_bos = False
    if tokenizer:
        from .gguf_tokenizer import tokenizer_from_gguf

        tok, bos, eos, add_bos = tokenizer_from_gguf(info.metadata, source=str(info.path))
        chat = info.metadata.get("tokenizer.chat_template")
        if chat is not None and not isinstance(chat, str):
            raise _err(info.path, "metadata 'tokenizer.chat_template' is not a string")
    report = {k: v for k, v in info.metadata.items() if not isinstance(v, list) or len(v) <= 64}
    types: dict[str, int] = {}
    for t in info.tensors.values():
        types[t.type_name] = types.get(t.type_name, 0) + 1
    report.update({"gguf.version": info.version, "gguf.tensor_types": types})
    return Loaded(config=config, state_dict=state, tokenizer=tok, chat_template=chat, bos_id=bos,
                  eos_ids=eos, add_bos=add_bos, source=str(info.path), metadata=report,
                  generation=from_gguf_metadata(info.metadata))


__all__ = ["GGUFInfo", "TensorInfo", "SUPPORTED_TYPES", "dequantize", "llama_config", "load_gguf", "q8_0_blocks",
           "read_gguf", "read_tensor", "septet_name"]
