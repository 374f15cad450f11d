"""Export a septet LLaMA to a llama.cpp GGUF file (architecture "llama").

Tensor names follow llama.cpp (token_embd, blk.N.attn_q, ..., output_norm, output); q and
k rows are permuted from septet's 'half' RoPE layout to the interleaved layout llama.cpp's
llama architecture expects. 2-D weights are stored as F32, F16 or Q8_0; norm weights always
stay F32. A byte-level BPE tokenizer is written as tokenizer.ggml.model "gpt2".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import DecoderConfig
from ..errors import CheckpointError
from ..fileio import atomic_path
from ..models.llama import LLaMAConfig
from ..tokenizer import Tokenizer
from .hf import as_config, check_state, half_to_interleaved, state_of

DTYPES = ("f32", "f16", "q8_0")

# llama.cpp token types (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def gguf_names(c: LLaMAConfig) -> dict[str, str]:
    """septet name -> GGUF tensor name."""
    m = {"tok_emb.weight": "token_embd.weight", "norm_f.weight": "output_norm.weight"}
    if not c.tie_embeddings:
        m["lm_head.weight"] = "output.weight"
    for i in range(c.n_layer):
        o, b = f"blocks.{i}.", f"blk.{i}."
        m.update({
            o + "attn_norm.weight": b + "attn_norm.weight",
            o + "attn.q_proj.weight": b + "attn_q.weight", o + "attn.k_proj.weight": b + "attn_k.weight",
            o + "attn.v_proj.weight": b + "attn_v.weight", o + "attn.o_proj.weight": b + "attn_output.weight",
            o + "mlp_norm.weight": b + "ffn_norm.weight",
            o + "mlp.gate_proj.weight": b + "ffn_gate.weight", o + "mlp.up_proj.weight": b + "ffn_up.weight",
            o + "mlp.down_proj.weight": b + "ffn_down.weight",
        })
    return m


def _tokenizer_vocab(tokenizer: Tokenizer, n_vocab: int, where: str) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges) of a byte-level BPE tokenizer, padded to n_vocab."""
    spec = json.loads(tokenizer.to_json_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{where}: GGUF export writes byte-level BPE tokenizers; this one is "
                              f"{model.get('type')!r}")
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1
    if size > n_vocab:
        raise CheckpointError(f"{where}: the tokenizer has {size} tokens but the model's vocab_size is {n_vocab}")
    tokens: list[str | None] = [None] * n_vocab
    for tok, i in vocab.items():
        tokens[i] = tok
    added = {a["content"]: bool(a.get("special")) for a in spec.get("added_tokens") or []}
    types = []
    for i, tok in enumerate(tokens):
        if tok is None:
            tokens[i] = f"[PAD{i}]"
            types.append(_UNUSED)
        elif tok in added:
            types.append(_CONTROL if added[tok] else _USER_DEFINED)
        else:
            types.append(_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges  # type: ignore[return-value]


def _encode_tensor(name: str, t: torch.Tensor, dtype: str):
    """(numpy array, raw GGML type or None) for one tensor."""
    import gguf

    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if a.ndim == 1 or dtype == "f32":
        return a, None
    if dtype == "f16" or a.shape[-1] % 32:  # Q8_0 blocks are 32 wide; fall back to F16
        return a.astype(np.float16), None
    q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    return q, gguf.GGMLQuantizationType.Q8_0


def save_gguf(model_or_state: nn.Module | dict[str, torch.Tensor], config: DecoderConfig | dict,
              path: str | os.PathLike, *, tokenizer: Tokenizer | None = None, chat_template: str | None = None,
              dtype: str = "f32", bos_id: int | None = None, eos_id: int | None = None,
              add_bos: bool = False, name: str = "septet", pre: str = "default") -> Path:
    """Write a llama-architecture GGUF file atomically (temp file next to `path`, then rename).
    `pre` names llama.cpp's pre-tokenizer; a model loaded from a GGUF keeps its own."""
    import gguf

    path = Path(path)
    c = as_config(config)
    if not isinstance(c, LLaMAConfig):
        raise CheckpointError(f"{path}: GGUF export writes the llama architecture; family {c.family!r} "
                              "is not supported (export it to HF instead)")
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: GGUF dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    state = state_of(model_or_state)
    check_state(c, state, "state dict to export")

    tokens = types = merges = None
    if tokenizer is not None:
        tokens, types, merges = _tokenizer_vocab(tokenizer, c.vocab_size, str(path))
        if eos_id is None and tokenizer.eot_token:
            eos_id = tokenizer.token_to_id(tokenizer.eot_token)
        if bos_id is None:
            bos_id = eos_id  # GPT-2-style byte-level BPE: one <|endoftext|> for both

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name)
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(c.context)
        w.add_embedding_length(c.d_model)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.d_ff)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_kv_head)
        w.add_key_length(c.d_head)
        w.add_value_length(c.d_head)
        w.add_rope_dimension_count(c.d_head)
        w.add_rope_freq_base(float(c.rope_theta))
        w.add_layer_norm_rms_eps(float(c.norm_eps))
        w.add_vocab_size(c.vocab_size)
        if tokenizer is not None:
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(pre)
            w.add_token_list(tokens)
            w.add_token_types(types)
            w.add_token_merges(merges)
            w.add_add_bos_token(bool(add_bos))
        if bos_id is not None:
            w.add_bos_token_id(int(bos_id))
        if eos_id is not None:
            w.add_eos_token_id(int(eos_id))
        if chat_template is not None:
            w.add_chat_template(chat_template)

        for ours, theirs in gguf_names(c).items():
            t = state[ours]
            if c.rope_style == "half" and ours.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
                t = half_to_interleaved(t, c.n_head if ".q_proj" in ours else c.n_kv_head)
            arr, raw = _encode_tensor(theirs, t, dtype)
            w.add_tensor(theirs, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


__all__ = ["save_gguf", "gguf_names", "DTYPES"]
