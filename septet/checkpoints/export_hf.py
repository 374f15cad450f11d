"""Export septet llama and (dense) gpt3 models to Hugging Face directories that
transformers loads with the same logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config import DecoderConfig
from ..errors import CheckpointError
from ..fileio import atomic_dir
from ..models.gpt3 import GPT3Config
from ..models.llama import LLaMAConfig
from ..tokenizer import Tokenizer
from .hf import (
    GPT2_ARCH,
    LLAMA_ARCH,
    SAFETENSORS,
    as_config,
    cast_state,
    check_state,
    interleaved_to_half,
    llama_names,
    state_of,
)


def septet_llama_to_hf(state: dict[str, torch.Tensor], c: LLaMAConfig) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs in llama_names(c).items():
        t = state[ours]
        if c.rope_style == "interleaved" and ours.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
            t = interleaved_to_half(t, c.n_head if ".q_proj" in ours else c.n_kv_head)
        out[theirs] = t
    return out


def septet_gpt3_to_hf(state: dict[str, torch.Tensor], c: GPT3Config) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
           "transformer.ln_f.weight": state["norm_f.weight"], "transformer.ln_f.bias": state["norm_f.bias"]}
    for i in range(c.n_layer):
        p, o = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + f"{ln}.weight"] = state[o + f"{ln}.weight"]
            out[p + f"{ln}.bias"] = state[o + f"{ln}.bias"]
        out[p + "attn.c_attn.weight"] = torch.cat(
            [state[o + f"attn.{n}_proj.weight"] for n in "qkv"], 0).t()  # Conv1D: (in, out)
        out[p + "attn.c_attn.bias"] = torch.cat([state[o + f"attn.{n}_proj.bias"] for n in "qkv"], 0)
        out[p + "attn.c_proj.weight"] = state[o + "attn.o_proj.weight"].t()
        out[p + "attn.c_proj.bias"] = state[o + "attn.o_proj.bias"]
        out[p + "mlp.c_fc.weight"] = state[o + "mlp.fc.weight"].t()
        out[p + "mlp.c_fc.bias"] = state[o + "mlp.fc.bias"]
        out[p + "mlp.c_proj.weight"] = state[o + "mlp.proj.weight"].t()
        out[p + "mlp.c_proj.bias"] = state[o + "mlp.proj.bias"]
    return out


_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _hf_config_dict(c: DecoderConfig, dtype: torch.dtype, bos: int | None, eos: int | None) -> dict:
    common = {"torch_dtype": _TORCH_DTYPE_NAMES.get(dtype, "float32"), "use_cache": True,
              "initializer_range": 0.02, "bos_token_id": bos, "eos_token_id": eos,
              "septet_family": c.family}
    if isinstance(c, LLaMAConfig):
        return {**common, "architectures": [LLAMA_ARCH], "model_type": "llama",
                "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
                "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
                "num_key_value_heads": c.n_kv_head, "head_dim": c.d_head,
                "max_position_embeddings": c.context, "rms_norm_eps": c.norm_eps,
                "rope_theta": c.rope_theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
                "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
                "pretraining_tp": 1}
    assert isinstance(c, GPT3Config)
    return {**common, "architectures": [GPT2_ARCH], "model_type": "gpt2",
            "vocab_size": c.vocab_size, "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_inner": c.d_ff, "n_positions": c.context, "n_ctx": c.context,
            "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu_new",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "tie_word_embeddings": True}


def _check_exportable(c: DecoderConfig, where: str) -> None:
    if isinstance(c, LLaMAConfig):
        return
    if isinstance(c, GPT3Config):
        if c.window is not None:
            raise CheckpointError(f"{where}: this GPT-3 has banded attention (window={c.window}) on odd layers, "
                                  "which GPT-2 cannot express; only window=None (all dense) models can be exported")
        if c.n_kv_head != c.n_head or c.n_head * c.d_head != c.d_model:
            raise CheckpointError(f"{where}: GPT-2 needs n_kv_head == n_head and n_head * d_head == d_model")
        return
    raise CheckpointError(f"{where}: family {c.family!r} has no HF export; septet exports llama and gpt3 (dense)")


def save_hf(model_or_state: nn.Module | dict[str, torch.Tensor], config: DecoderConfig | dict,
            path: str | os.PathLike, *, tokenizer: Tokenizer | None = None,
            chat_template: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write an HF directory (LlamaForCausalLM or GPT2LMHeadModel) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    c = as_config(config)
    _check_exportable(c, str(path))
    state = state_of(model_or_state)
    check_state(c, state, "state dict to export")
    state = cast_state(state, dtype)
    tensors = septet_llama_to_hf(state, c) if isinstance(c, LLaMAConfig) else septet_gpt3_to_hf(state, c)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    out_dtype = next(iter(tensors.values())).dtype

    bos = eos = None
    eos_str = None
    if tokenizer is not None:
        eos_str = (tokenizer.eot_token
                   if tokenizer.eot_token and tokenizer.token_to_id(tokenizer.eot_token) is not None else None)
        eos = tokenizer.token_to_id(eos_str) if eos_str else None
        bos = eos if isinstance(c, GPT3Config) else None
        if tokenizer.vocab_size > c.vocab_size:
            raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                                  f"vocab_size is {c.vocab_size}; they do not belong together")
    hf_cfg = _hf_config_dict(c, out_dtype, bos, eos)

    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        gen = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_json_str(), encoding="utf-8")
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.context,
                       "eos_token": eos_str, "bos_token": eos_str if bos is not None else None,
                       "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
            if chat_template is not None:
                tok_cfg["chat_template"] = chat_template
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
        if chat_template is not None:
            (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return path


__all__ = ["save_hf", "septet_llama_to_hf", "septet_gpt3_to_hf"]
