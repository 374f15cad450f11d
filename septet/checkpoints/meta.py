"""Meta's original LLaMA release: `params.json` + `consolidated.NN.pth` (+ `tokenizer.model`).

Each `consolidated.NN.pth` is one model-parallel rank. Column-parallel matrices (wq, wk,
wv, w1, w3, output) are split along their output rows (dim 0), row-parallel ones (wo, w2)
along their input columns (dim 1), the token embedding along the model dimension (dim 1,
fairscale's ParallelEmbedding), and norms are replicated.

Meta's q/k rows use the interleaved RoPE layout (pairs (x[2i], x[2i+1])); septet's state
dicts use HF's 'half' layout, so q and k are permuted per head on load — the same
permutation HF's conversion script applies.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..models.llama import LLaMAConfig
from . import Loaded
from .hf import cast_state, check_state, interleaved_to_half, read_json

PARAMS = "params.json"
_SHARD = re.compile(r"^consolidated\.(\d{2,})\.pth$")

# tensor kind -> concatenation dim across model-parallel shards (None: replicated)
_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
              "wo": 1, "w2": 1, "tok_embeddings": 1,
              "attention_norm": None, "ffn_norm": None, "norm": None}


def _kind(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """LLaMA's FeedForward hidden size, exactly as Meta's model.py computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _shards(path: Path) -> list[Path]:
    found = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _SHARD.match(p.name)))
    if not found:
        raise CheckpointError(f"{path} has no consolidated.00.pth; a Meta LLaMA release needs its weights")
    for want, (got, _p) in enumerate(found):
        if got != want:
            raise CheckpointError(f"{path}: model-parallel shard consolidated.{want:02d}.pth is missing "
                                  f"(found {', '.join(q.name for _, q in found)})")
    return [p for _, p in found]


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(file), weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file} holds objects other than tensors and was refused for safety "
                              f"({str(e).splitlines()[0] if str(e) else 'unpickling error'})") from None
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file} is truncated or not a PyTorch weights file ({reason}); re-download it") from None
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{file} is not a state dict of tensors")
    return obj


def _merge(shards: list[dict[str, torch.Tensor]], files: list[Path]) -> dict[str, torch.Tensor]:
    names = list(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        if set(s) != set(names):
            odd = sorted(set(s) ^ set(names))[0]
            raise CheckpointError(f"{f}: tensor '{odd}' is in some shards but not others; the release is incomplete")
    out = {}
    for name in names:
        if name == "rope.freqs":  # LLaMA-1 stores the RoPE frequencies; recomputed by the model
            continue
        kind = _kind(name)
        if kind not in _SPLIT_DIM:
            raise CheckpointError(f"{files[0]}: unexpected tensor '{name}' (not part of the LLaMA architecture)")
        dim = _SPLIT_DIM[kind]
        parts = [s[name] for s in shards]
        if dim is None or len(parts) == 1:
            out[name] = parts[0]
        else:
            try:
                out[name] = torch.cat(parts, dim=dim)
            except RuntimeError as e:
                raise CheckpointError(f"{files[0]}: shards of tensor '{name}' do not concatenate on dim {dim} "
                                      f"({str(e).splitlines()[0]})") from None
    return out


def _tokenizer_from_sentencepiece(file: Path):
    """(Tokenizer | None, note). Conversion needs transformers' SentencePiece converter and
    either `sentencepiece` or `protobuf`; without them the loader still returns the weights."""
    try:
        from transformers import LlamaTokenizerFast

        from ..tokenizer import Tokenizer

        fast = LlamaTokenizerFast(vocab_file=str(file))
        return Tokenizer.from_hf(fast.backend_tokenizer, eot_token="</s>"), "tokenizer.model converted"
    except Exception as e:  # ImportError, missing protobuf/sentencepiece, or a bad file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, (f"tokenizer.model present but not converted ({reason}); install sentencepiece "
                      "or pass a tokenizer.json")


def load_meta(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load a Meta LLaMA release directory as a septet llama config + state dict ('half' RoPE)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Meta LLaMA directory {path} does not exist")
    pfile = path / PARAMS
    params = read_json(pfile, "a Meta LLaMA release needs params.json")
    if not isinstance(params, dict):
        raise CheckpointError(f"{pfile} is not a JSON object")

    def num(key: str, kind=int, default=...):
        v = params.get(key, default)
        if v is ... or v is None:
            if default is ...:
                raise CheckpointError(f"{pfile}: field '{key}' is missing")
            return default
        if isinstance(v, bool) or not isinstance(v, kind):
            raise CheckpointError(f"{pfile}: field '{key}' is {v!r}; expected a number")
        return v

    dim, n_layers, n_heads = num("dim"), num("n_layers"), num("n_heads")
    n_kv = num("n_kv_heads", default=n_heads)
    multiple_of = num("multiple_of", default=256)
    mult = num("ffn_dim_multiplier", (int, float), None)
    norm_eps = float(num("norm_eps", (int, float), 1e-6))
    rope_theta = float(num("rope_theta", (int, float), 10000.0))
    context = num("max_seq_len", default=2048)
    if params.get("use_scaled_rope"):
        raise CheckpointError(f"{pfile}: field 'use_scaled_rope' is true (LLaMA 3.1 RoPE scaling); not supported")

    files = _shards(path)
    state_meta = _merge([_load_shard(f) for f in files], files)
    if "tok_embeddings.weight" not in state_meta:
        raise CheckpointError(f"{files[0]}: tensor 'tok_embeddings.weight' is missing; the release is incomplete")
    vocab = num("vocab_size", default=-1)
    if vocab <= 0:  # LLaMA-1 ships vocab_size = -1: the tokenizer decides
        vocab = state_meta["tok_embeddings.weight"].shape[0]
    try:
        config = LLaMAConfig(vocab_size=vocab, n_layer=n_layers, d_model=dim, n_head=n_heads, n_kv_head=n_kv,
                             d_ff=meta_ffn_dim(dim, multiple_of, mult), context=context, norm_eps=norm_eps,
                             rope_theta=rope_theta, rope_style="half", tie_embeddings=False)
    except ConfigError as e:
        raise CheckpointError(f"{pfile}: {e}") from None

    names: dict[str, str] = {"tok_emb.weight": "tok_embeddings.weight", "norm_f.weight": "norm.weight",
                             "lm_head.weight": "output.weight"}
    for i in range(n_layers):
        p, o = f"layers.{i}.", f"blocks.{i}."
        names.update({
            o + "attn.q_proj.weight": p + "attention.wq.weight", o + "attn.k_proj.weight": p + "attention.wk.weight",
            o + "attn.v_proj.weight": p + "attention.wv.weight", o + "attn.o_proj.weight": p + "attention.wo.weight",
            o + "mlp.gate_proj.weight": p + "feed_forward.w1.weight",
            o + "mlp.down_proj.weight": p + "feed_forward.w2.weight",
            o + "mlp.up_proj.weight": p + "feed_forward.w3.weight",
            o + "attn_norm.weight": p + "attention_norm.weight", o + "mlp_norm.weight": p + "ffn_norm.weight",
        })
    where = lambda name: str(files[0])  # noqa: E731  (every tensor is in every shard)
    state = {}
    for ours, theirs in names.items():
        if theirs not in state_meta:
            raise CheckpointError(f"{files[0]}: tensor '{theirs}' is missing; the release is incomplete")
        state[ours] = state_meta[theirs]
    extra = sorted(set(state_meta) - set(names.values()))
    if extra:
        raise CheckpointError(f"{files[0]}: unexpected tensor '{extra[0]}' (not part of the LLaMA architecture)")
    check_state(config, state, where, names)
    for i in range(n_layers):
        q, k = f"blocks.{i}.attn.q_proj.weight", f"blocks.{i}.attn.k_proj.weight"
        state[q] = interleaved_to_half(state[q], n_heads)
        state[k] = interleaved_to_half(state[k], n_kv)
    state = {k: v.contiguous() for k, v in cast_state(state, dtype).items()}

    metadata = {"format": "meta", "files": [f.name for f in files], "params": params}
    if "max_seq_len" not in params:
        metadata["note_context"] = "params.json has no max_seq_len; context set to 2048"
    tokenizer = None
    bos_id, eos_ids = None, ()
    if (path / "tokenizer.model").is_file():
        tokenizer, note = _tokenizer_from_sentencepiece(path / "tokenizer.model")
        metadata["tokenizer_note"] = note
        if tokenizer is not None:
            bos_id = tokenizer.token_to_id("<s>")
            eos = tokenizer.token_to_id("</s>")
            eos_ids = (eos,) if eos is not None else ()
    else:
        metadata["tokenizer_note"] = "no tokenizer.model in the release"
    if tokenizer is None:
        bos_id, eos_ids = 1, (2,)  # LLaMA's SentencePiece ids for <s> and </s>
    return Loaded(config=config, state_dict=state, tokenizer=tokenizer, bos_id=bos_id, eos_ids=eos_ids,
                  add_bos=True, source=str(path), metadata=metadata)


__all__ = ["load_meta", "meta_ffn_dim"]
