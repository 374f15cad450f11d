"""Hugging Face model directories: load into septet (export lives in export_hf.py).

An HF directory holds `config.json` (its `architectures` / `model_type` name the model),
the weights (`model.safetensors`, a sharded `model.safetensors.index.json` + shards, or a
legacy `pytorch_model.bin`, read only with `torch.load(weights_only=True)`), and optionally
`tokenizer.json`, `tokenizer_config.json` (chat template, bos/eos, add_bos),
`chat_template.jinja` and `generation_config.json` (eos ids).

Supported architectures:
- `LlamaForCausalLM` -> septet `llama` (HF's q/k rows already use the 'half' RoPE layout
  septet uses, so tensors are renamed, never permuted);
- `GPT2LMHeadModel`  -> septet `gpt3` with `window=None` (all layers dense). GPT-2 stores
  its projections as Conv1D (in, out): they are transposed, and the fused `c_attn` is split
  into q, k, v.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import DecoderConfig
from ..errors import CheckpointError, ConfigError
from ..generation_config import from_hf_dir
from ..models import config_from_dict
from ..models.gpt3 import GPT3Config
from ..models.llama import LLaMAConfig
from ..tokenizer import Tokenizer
from . import Loaded

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"

LLAMA_ARCH = "LlamaForCausalLM"
GPT2_ARCH = "GPT2LMHeadModel"
# architecture name -> (model_type, loader key)
SUPPORTED_ARCHITECTURES = {LLAMA_ARCH: "llama", GPT2_ARCH: "gpt2"}
_MODEL_TYPES = {"llama": LLAMA_ARCH, "gpt2": GPT2_ARCH}

# buffers some checkpoints carry that are recomputed by the model (not weights)
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


# ============================================================================ small helpers

def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; a missing or malformed file is a one-line CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({_first_line(e)}); re-save or re-download it") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def state_of(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's state dict, or the dict itself (tensors detached)."""
    if isinstance(model_or_state, nn.Module):
        sd = model_or_state.state_dict()
    elif isinstance(model_or_state, dict):
        sd = model_or_state
    else:
        raise CheckpointError(f"expected a septet model or a state dict, got {type(model_or_state).__name__}")
    return {k: v.detach() for k, v in sd.items()}


def as_config(config: DecoderConfig | dict) -> DecoderConfig:
    if isinstance(config, DecoderConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config, "config")
    raise ConfigError(f"expected a septet config or its dict, got {type(config).__name__}")


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype` (others untouched); tensors that share memory stay shared."""
    if dtype is None:
        return state
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, t in state.items():
        if t.is_floating_point() and t.dtype != dtype:
            key = id(t)
            if key not in done:
                done[key] = t.to(dtype)
            out[k] = done[key]
        else:
            out[k] = t
    return out


def check_state(config: DecoderConfig, state: dict[str, torch.Tensor], source: str | Callable[[str], str],
                names: dict[str, str] | None = None) -> None:
    """Compare `state` with the parameters of the septet model `config` builds (on the meta
    device: nothing is allocated). `names` maps septet names to the checkpoint's own, for
    error messages."""
    from ..models import build

    expected = {k: tuple(v.shape) for k, v in build(config, device="meta").state_dict().items()}
    names = names or {}
    where = source if callable(source) else (lambda name: source)
    for k, shape in expected.items():
        if k not in state:
            raise CheckpointError(f"{where(names.get(k, k))}: tensor '{names.get(k, k)}' is missing; "
                                  "the checkpoint is incomplete")
        if tuple(state[k].shape) != shape:
            raise CheckpointError(f"{where(names.get(k, k))}: tensor '{names.get(k, k)}' "
                                  f"has shape {tuple(state[k].shape)}, "
                                  f"expected {shape} from the config; the weights do not match config")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{where(names.get(extra[0], extra[0]))}: "
                              f"unexpected tensor '{names.get(extra[0], extra[0])}' "
                              "(a feature septet's model does not have)")


# ============================================================================ weights

class _Tensors:
    """The tensors of an HF directory with the file each came from (for messages)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.file_of: dict[str, str] = {}
        self.files: list[str] = []

    def add(self, file: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.files.append(file.name)
        for k, v in tensors.items():
            if not torch.is_tensor(v):
                raise CheckpointError(f"{file}: entry '{k}' is a {type(v).__name__}, not a tensor")
            self.tensors[k] = v
            self.file_of[k] = str(file)

    def where(self, name: str) -> str:
        return self.file_of.get(name, self.files[0] if self.files else "?")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not file.is_file():
        raise CheckpointError(f"{file} is missing; re-download the checkpoint")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for bad headers and sizes
        raise CheckpointError(f"{file} is truncated or corrupt ({_first_line(e)}); re-download it") from None


def _read_torch_bin(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; re-download the checkpoint")
    try:
        obj = torch.load(str(file), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file} holds objects other than tensors and was refused for safety "
                              f"({_first_line(e)}); convert it to safetensors from a trusted source") from None
    except Exception as e:
        raise CheckpointError(f"{file} is truncated or not a PyTorch weights file ({_first_line(e)}); "
                              "re-download it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def _shard_files(index_file: Path) -> list[Path]:
    index = read_json(index_file, "the sharded checkpoint cannot be read")
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(f"{index_file} has no 'weight_map'; re-download the checkpoint")
    shards = []
    for name in wmap.values():
        if (not isinstance(name, str) or not name or os.path.isabs(name) or Path(name).name != name):
            raise CheckpointError(f"{index_file}: shard name {name!r} is not a file name in this directory")
        if name not in shards:
            shards.append(name)
    return [index_file.parent / s for s in shards]


def read_hf_weights(path: Path) -> _Tensors:
    """All tensors of an HF directory, from whichever weights format it has."""
    out = _Tensors()
    if (path / SAFETENSORS).is_file():
        out.add(path / SAFETENSORS, _read_safetensors(path / SAFETENSORS))
    elif (path / SAFETENSORS_INDEX).is_file():
        for f in _shard_files(path / SAFETENSORS_INDEX):
            out.add(f, _read_safetensors(f))
    elif (path / TORCH_BIN).is_file():
        out.add(path / TORCH_BIN, _read_torch_bin(path / TORCH_BIN))
    elif (path / TORCH_BIN_INDEX).is_file():
        for f in _shard_files(path / TORCH_BIN_INDEX):
            out.add(f, _read_torch_bin(f))
    else:
        raise CheckpointError(f"{path} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
                              f"{TORCH_BIN} or {TORCH_BIN_INDEX}")
    return out


# ============================================================================ configs

def hf_architecture(cfg: dict, source: str) -> str:
    """The supported architecture named by an HF config.json, or a clear error."""
    archs = cfg.get("architectures")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if isinstance(archs, list) and archs:
        for a in archs:
            if a in SUPPORTED_ARCHITECTURES:
                return a
        raise CheckpointError(f"{source}: field 'architectures' is {archs}; septet loads {supported}")
    mt = cfg.get("model_type")
    if mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    raise CheckpointError(f"{source}: field 'model_type' is {mt!r} and 'architectures' is missing; "
                          f"septet loads {supported} (model_type {', '.join(_MODEL_TYPES)})")


def _get(cfg: dict, key: str, source: str, kind: type | tuple = int, default: Any = ...) -> Any:
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise CheckpointError(f"{source}: field '{key}' is missing")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, kind):
        raise CheckpointError(f"{source}: field '{key}' is {v!r}; expected a number")
    return v


def llama_config_from_hf(cfg: dict, source: str) -> LLaMAConfig:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: field 'rope_scaling' is {rope!r}; expected an object or null")
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in (None, "default"):
        raise CheckpointError(f"{source}: field 'rope_scaling' has rope_type {rope_type!r}; septet supports "
                              "only plain RoPE (none/default)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"{source}: field '{key}' is true; septet's LLaMA has no biases")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: field 'hidden_act' is {act!r}; septet's LLaMA uses 'silu' (SwiGLU)")
    theta = cfg.get("rope_theta")
    if theta is None:
        theta = rope.get("rope_theta", 10000.0)
    n_head = _get(cfg, "num_attention_heads", source)
    try:
        return LLaMAConfig(
            vocab_size=_get(cfg, "vocab_size", source),
            n_layer=_get(cfg, "num_hidden_layers", source),
            d_model=_get(cfg, "hidden_size", source),
            n_head=n_head,
            n_kv_head=_get(cfg, "num_key_value_heads", source, default=n_head),
            d_head=_get(cfg, "head_dim", source, default=0),
            d_ff=_get(cfg, "intermediate_size", source),
            context=_get(cfg, "max_position_embeddings", source, default=2048),
            norm_eps=float(_get(cfg, "rms_norm_eps", source, (int, float), 1e-6)),
            rope_theta=float(theta),
            rope_style="half",
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def gpt2_config_from_hf(cfg: dict, source: str) -> GPT3Config:
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: field 'activation_function' is {act!r}; septet's GPT-3 uses the tanh "
                              "GELU ('gelu_new' or 'gelu_pytorch_tanh')")
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise CheckpointError(f"{source}: field 'scale_attn_by_inverse_layer_idx' is true; not supported")
    if cfg.get("scale_attn_weights", True) is False:
        raise CheckpointError(f"{source}: field 'scale_attn_weights' is false; not supported")
    if cfg.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{source}: field 'tie_word_embeddings' is false; septet's GPT-3 ties its head")
    d = _get(cfg, "n_embd", source)
    try:
        return GPT3Config(
            vocab_size=_get(cfg, "vocab_size", source),
            n_layer=_get(cfg, "n_layer", source),
            d_model=d,
            n_head=_get(cfg, "n_head", source),
            d_ff=_get(cfg, "n_inner", source, default=4 * d),
            context=_get(cfg, "n_positions", source, default=1024),
            norm_eps=float(_get(cfg, "layer_norm_epsilon", source, (int, float), 1e-5)),
            window=None,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


# ============================================================================ name maps

def llama_names(c: LLaMAConfig) -> dict[str, str]:
    """septet name -> HF LlamaForCausalLM name."""
    m = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
    if not c.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(c.n_layer):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        for w in ("q", "k", "v", "o"):
            m[o + f"attn.{w}_proj.weight"] = p + f"self_attn.{w}_proj.weight"
        for w in ("gate", "up", "down"):
            m[o + f"mlp.{w}_proj.weight"] = p + f"mlp.{w}_proj.weight"
        m[o + "attn_norm.weight"] = p + "input_layernorm.weight"
        m[o + "mlp_norm.weight"] = p + "post_attention_layernorm.weight"
    return m


def hf_llama_to_septet(hf: dict[str, torch.Tensor], c: LLaMAConfig,
                       where: Callable[[str], str] = lambda n: "checkpoint") -> dict[str, torch.Tensor]:
    names = llama_names(c)
    # some exports drop the "model." prefix (LlamaModel); accept both
    if "model.embed_tokens.weight" not in hf and "embed_tokens.weight" in hf:
        hf = {("model." + k if not k.startswith("lm_head") else k): v for k, v in hf.items()}
    out = {}
    for ours, theirs in names.items():
        if theirs not in hf:
            raise CheckpointError(f"{where(theirs)}: tensor '{theirs}' is missing; the checkpoint is incomplete")
        out[ours] = hf[theirs]
    used = set(names.values()) | ({"lm_head.weight"} if c.tie_embeddings else set())
    extra = sorted(k for k in hf if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(f"{where(extra[0])}: unexpected tensor '{extra[0]}' "
                              "(a feature septet's LLaMA does not have)")
    check_state(c, out, where, names)
    return out


def hf_gpt2_to_septet(hf: dict[str, torch.Tensor], c: GPT3Config,
                      where: Callable[[str], str] = lambda n: "checkpoint") -> dict[str, torch.Tensor]:
    pre = "transformer." if any(k.startswith("transformer.") for k in hf) else ""

    def get(name: str) -> torch.Tensor:
        if pre + name not in hf:
            raise CheckpointError(f"{where(pre + name)}: tensor '{pre + name}' is missing; "
                                  "the checkpoint is incomplete")
        return hf[pre + name]

    C = c.d_model
    if c.n_kv_head != c.n_head or c.d_head * c.n_head != C:
        raise CheckpointError("GPT-2 needs n_kv_head == n_head and n_head * d_head == d_model")
    out = {"tok_emb.weight": get("wte.weight"), "pos_emb.weight": get("wpe.weight"),
           "norm_f.weight": get("ln_f.weight"), "norm_f.bias": get("ln_f.bias")}
    used = {pre + n for n in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")} | {"lm_head.weight"}

    def conv(name: str, shape: tuple[int, int]) -> torch.Tensor:
        t = get(name)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{where(pre + name)}: tensor '{pre + name}' has shape {tuple(t.shape)}, "
                                  f"expected {shape} (Conv1D: in, out) from the config")
        return t.t()

    for i in range(c.n_layer):
        p, o = f"h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[o + f"{ln}.weight"] = get(p + f"{ln}.weight")
            out[o + f"{ln}.bias"] = get(p + f"{ln}.bias")
        w_qkv = conv(p + "attn.c_attn.weight", (C, 3 * C))  # (3C, C) after the transpose
        b_qkv = get(p + "attn.c_attn.bias")
        if tuple(b_qkv.shape) != (3 * C,):
            raise CheckpointError(f"{where(pre + p + 'attn.c_attn.bias')}: tensor '{pre + p}attn.c_attn.bias' has "
                                  f"shape {tuple(b_qkv.shape)}, expected {(3 * C,)}")
        for j, name in enumerate(("q", "k", "v")):
            out[o + f"attn.{name}_proj.weight"] = w_qkv[j * C:(j + 1) * C]
            out[o + f"attn.{name}_proj.bias"] = b_qkv[j * C:(j + 1) * C]
        out[o + "attn.o_proj.weight"] = conv(p + "attn.c_proj.weight", (C, C))
        out[o + "attn.o_proj.bias"] = get(p + "attn.c_proj.bias")
        out[o + "mlp.fc.weight"] = conv(p + "mlp.c_fc.weight", (C, c.d_ff))
        out[o + "mlp.fc.bias"] = get(p + "mlp.c_fc.bias")
        out[o + "mlp.proj.weight"] = conv(p + "mlp.c_proj.weight", (c.d_ff, C))
        out[o + "mlp.proj.bias"] = get(p + "mlp.c_proj.bias")
        used |= {pre + p + n for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                       "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                                       "attn.c_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                                       "mlp.c_proj.weight", "mlp.c_proj.bias")}
    extra = sorted(k for k in hf if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(f"{where(extra[0])}: unexpected tensor '{extra[0]}' "
                              "(a feature septet's GPT-3 does not have)")
    out = {k: v.contiguous() for k, v in out.items()}
    check_state(c, out, where)
    return out


# ============================================================================ tokenizer

def _token_str(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _ids(v: Any) -> list[int]:
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


def _hf_tokenizer_parts(path: Path, cfg: dict) -> dict[str, Any]:
    """tokenizer, chat template, bos id, eos ids and add_bos from an HF directory."""
    tok_cfg: dict = {}
    if (path / "tokenizer_config.json").is_file():
        tok_cfg = read_json(path / "tokenizer_config.json", "")
        if not isinstance(tok_cfg, dict):
            raise CheckpointError(f"{path / 'tokenizer_config.json'} is not a JSON object")
    gen_cfg: dict = {}
    if (path / "generation_config.json").is_file():
        gen_cfg = read_json(path / "generation_config.json", "")
        if not isinstance(gen_cfg, dict):
            gen_cfg = {}

    chat = tok_cfg.get("chat_template")
    if isinstance(chat, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in chat if isinstance(d, dict)}
        chat = named.get("default") or next(iter(named.values()), None)
    if (path / "chat_template.jinja").is_file():
        chat = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(chat, str):
        chat = None

    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(path / "tokenizer.json")
        eos_str = _token_str(tok_cfg.get("eos_token"))
        if eos_str is not None and tokenizer.token_to_id(eos_str) is not None:
            tokenizer = Tokenizer.from_hf(tokenizer.hf, eot_token=eos_str)

    def tid(tok: str | None) -> int | None:
        return tokenizer.token_to_id(tok) if (tokenizer is not None and tok is not None) else None

    bos = tid(_token_str(tok_cfg.get("bos_token")))
    if bos is None:
        bos = next(iter(_ids(gen_cfg.get("bos_token_id")) or _ids(cfg.get("bos_token_id"))), None)
    eos: list[int] = []
    # generation_config.json overrides config.json (as in transformers); the tokenizer's eos joins
    for source_ids in (_ids(gen_cfg.get("eos_token_id")) or _ids(cfg.get("eos_token_id")),
                       [tid(_token_str(tok_cfg.get("eos_token")))]):
        for i in source_ids:
            if i is not None and i not in eos:
                eos.append(i)
    if tokenizer is not None and not eos:
        try:
            eos.append(tokenizer.eot_id)
        except ConfigError:
            pass
    add_bos = tok_cfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds_bos(tokenizer, bos)
    return {"tokenizer": tokenizer, "chat_template": chat, "bos_id": bos, "eos_ids": tuple(eos),
            "add_bos": bool(add_bos and bos is not None)}


def _post_processor_adds_bos(tokenizer: Tokenizer | None, bos: int | None) -> bool:
    """Whether tokenizer.json's TemplateProcessing starts a single sequence with bos."""
    if tokenizer is None or bos is None:
        return False
    try:
        post = json.loads(tokenizer.to_json_str()).get("post_processor") or {}
        procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        for p in procs:
            if p.get("type") == "TemplateProcessing":
                first = (p.get("single") or [{}])[0]
                tok = (first.get("SpecialToken") or {}).get("id")
                return tok is not None and tokenizer.token_to_id(tok) == bos
    except (AttributeError, TypeError, ValueError):
        return False
    return False


# ============================================================================ load

def load_hf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load an HF LlamaForCausalLM / GPT2LMHeadModel directory as septet config + state dict."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"HF checkpoint directory {path} does not exist")
    cfg_file = path / "config.json"
    cfg = read_json(cfg_file, "an HF checkpoint directory needs config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file} is not a JSON object")
    arch = hf_architecture(cfg, str(cfg_file))
    if arch == LLAMA_ARCH:
        config = llama_config_from_hf(cfg, str(cfg_file))
        weights = read_hf_weights(path)
        state = hf_llama_to_septet(weights.tensors, config, weights.where)
    else:
        config = gpt2_config_from_hf(cfg, str(cfg_file))
        weights = read_hf_weights(path)
        state = hf_gpt2_to_septet(weights.tensors, config, weights.where)
    state = cast_state(state, dtype)
    parts = _hf_tokenizer_parts(path, cfg)
    return Loaded(config=config, state_dict=state, source=str(path),
                  metadata={"format": "hf", "architecture": arch, "files": weights.files,
                            "torch_dtype": cfg.get("torch_dtype") or cfg.get("dtype")},
                  generation=from_hf_dir(path), **parts)


# ============================================================================ save

def half_to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Q/K rows (n_head·D, C) from HF's 'half' RoPE layout, which rotates (x[i], x[i+D/2]),
    to the interleaved layout of Meta's release and llama.cpp, which rotates (x[2i], x[2i+1])."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_half(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of half_to_interleaved (what HF's LLaMA conversion script applies)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


__all__ = ["load_hf", "SUPPORTED_ARCHITECTURES", "hf_architecture", "llama_config_from_hf",
           "gpt2_config_from_hf", "hf_llama_to_septet", "hf_gpt2_to_septet", "read_hf_weights",
           "half_to_interleaved", "interleaved_to_half", "check_state", "state_of", "cast_state", "read_json"]
