"""The Python entry point: `septet.load(name_or_path)`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import assets
from .checkpoints.native import latest_checkpoint
from .errors import CheckpointError, ConfigError, SeptetError
from .generation_config import generation_defaults
from .inference import Sampling, generate_batch, generate_ids, optimize_for_inference, stream_text
from .models import build, get_preset, presets
from .models.base import DecoderLM
from .tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_checkpoint(path: str | Path) -> Path:
    """A model file or directory, or a training run directory (its newest checkpoint)."""
    p = Path(path)
    if p.is_file() or (p / "config.json").is_file() or (p / "params.json").is_file():
        return p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{p} is not a checkpoint (no config.json or params.json) nor a training "
                              "run directory with step-* checkpoints; pass a path from `septet train --out`")
    return latest


@dataclass
class LoadedModel:
    """A model with its tokenizer and chat conventions.

    The first generation call packs q/k/v and gate/up weights for decoding
    (`inference.optimize_for_inference`): from then on `.model` is inference-only and its
    state_dict uses the packed names. To save or fine-tune weights, load them again (or
    export from the source file with `septet export`)."""

    model: DecoderLM
    tokenizer: Tokenizer | None
    path: Path | None = None
    name: str = ""
    chat_template: str | None = None
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    add_bos: bool = False
    # the sampling its authors recommend (septet.generation_config): Sampling keywords
    generation_defaults: dict = field(default_factory=dict)

    @property
    def bos_token(self) -> str:
        return self._token(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self._token(self.eos_ids[0] if self.eos_ids else None)

    def _token(self, i: int | None) -> str:
        if i is None or self.tokenizer is None:
            return ""
        return self.tokenizer.hf.id_to_token(i) or ""

    def need_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a one-line error for a model that has none (a preset)."""
        if self.tokenizer is None:
            raise ConfigError(f"{self.name or 'this model'} has no tokenizer (a preset has random "
                              "weights); load a checkpoint or pass token ids")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the model's BOS prepended when it expects one."""
        ids = self.need_tokenizer().encode(text)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def generate(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 **more) -> str:
        """The completion of `prompt`. More keywords: min_p, repetition_penalty, stop
        (strings that end the text, not included), compile."""
        return "".join(self.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed, **more))

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        return self.stream_ids(self.prompt_ids(prompt), **sampling)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids a completion of `prompt` starts from (BOS where the model wants one; an
        empty prompt starts a document)."""
        tok = self.need_tokenizer()
        ids = self.encode(prompt) if prompt else []
        if not ids:  # an empty prompt starts a document, as in training
            ids = [self.bos_id if self.bos_id is not None else tok.eot_id]
        return ids

    def stop_ids(self) -> set[int]:
        """Ids that end a reply: the model's end-of-sequence ids and its end-of-text token."""
        tok = self.need_tokenizer()
        return set(self.eos_ids) | ({tok.eot_id} if tok.eot_token else set())

    def stream_ids(self, ids: list[int], *, stop: str | list[str] | tuple[str, ...] = (),
                   **sampling) -> Iterator[str]:
        """Yield text pieces as tokens arrive; a piece is emitted once it decodes to whole
        characters, so a multi-byte UTF-8 character is never split. `stop` strings end the
        text as soon as it contains one (the stop string is not emitted)."""
        tok = self.need_tokenizer()
        stop_ids = self.stop_ids()
        optimize_for_inference(self.model)
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        ids_iter = generate_ids(self.model, ids, Sampling(**sampling), stop_ids=stop_ids)
        return stream_text(tok, ids_iter, stop_ids, stops)

    def generate_batch(self, prompts: list[str], *, stop: str | list[str] | tuple[str, ...] = (),
                       **sampling) -> list[str]:
        """Completions of several prompts, run as one left-padded batch."""
        tok = self.need_tokenizer()
        stop_ids = self.stop_ids()
        optimize_for_inference(self.model)
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        rows = generate_batch(self.model, [self.prompt_ids(p) for p in prompts], Sampling(**sampling),
                              stop_ids=stop_ids)
        return ["".join(stream_text(tok, r, stop_ids, stops)) for r in rows]


def _resolve_name(name: str) -> Path | None:
    """A registry asset name → its model file (fetched on first use)."""
    try:
        asset = assets.get_asset(name)
    except SeptetError:
        return None
    root = assets.fetch(asset)
    files = sorted(root.glob("*.gguf")) or sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"asset {asset.name} holds no model file in {root}; re-fetch it")
    return files[0]


def model_path(name_or_path: str | Path) -> Path:
    """Where a model named on the command line lives: a path (a run directory resolves to
    its newest checkpoint) or a registry asset, fetched on first use."""
    text = str(name_or_path)
    p = Path(text)
    if not p.exists():
        asset_file = _resolve_name(text)
        if asset_file is None:
            known = ", ".join(a.name for a in assets.list_assets())
            raise CheckpointError(f"model '{text}' is not a file, a directory, a registry asset "
                                  f"({known}) or a preset (`septet models`)")
        return asset_file
    return resolve_checkpoint(p)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(name_or_path: str | Path = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | str = torch.float32, quant: str | None = None,
         group_size: int = 32) -> LoadedModel:
    """Load a model: a registry asset name (e.g. "smollm2"), a septet checkpoint or run
    directory, an HF or Meta directory, a .gguf file — or a preset name (random weights).

    `quant` (septet.inference.quant.MODES) replaces the linear layers (and a tied head) by
    weight-only quantised ones (int4 groups of `group_size` inputs); the model is then
    inference-only. A checkpoint is quantised while it is read (`QuantizeOnLoad`): each
    block as soon as its weights are in, so the float model never exists whole; the result
    is the same as quantising the loaded float model. The output head is int8 and, where
    its kernel does not already give exact fp32 logits, recomputes each row's top logits in
    fp32 (`RefinedHead`). On septet's kernels the activations stay fp32; "-a8" modes
    quantise them per block of 32 as llama.cpp does (agreement with llama.cpp:
    docs/benchmarks.md, tests/test_llamacpp_parity.py).

    `quant="auto"`: what the file already is (`native_quant`), so a 4-bit GGUF runs on the
    4-bit kernels without losing anything; anything else loads unquantised."""
    from .checkpoints.convert import load_any
    from .models import build_on_meta

    dtype = _dtype(dtype)
    text = str(name_or_path)
    if not Path(text).exists() and _resolve_name(text) is None and text in presets():
        model = build(get_preset(text).config).to(device=device, dtype=dtype).eval()
        return _quantized(LoadedModel(model, None, None, name=text), None if quant == "auto" else quant,
                          group_size)
    p = model_path(text)
    if quant == "auto":
        quant = native_quant(p) if torch.device(device).type == "cpu" else None
    if quant:
        from .inference.quant import QuantizeOnLoad, QuantPlan

        if torch.device(device).type != "cpu":
            raise ConfigError(f"--quant {quant} uses PyTorch's CPU kernels; load the model on the CPU")
        hook: list[QuantizeOnLoad] = []

        def sink(config):
            hook.append(QuantizeOnLoad(build_on_meta(config), QuantPlan(quant, group_size=group_size),
                                       dtype=dtype, source=str(p)))
            return hook[0]

        loaded = load_any(p, dtype=dtype, sink=sink)
        model = hook[0].finish().eval()
        _release_freed_memory()
    else:
        loaded = load_any(p, dtype=dtype)
        model = build_on_meta(loaded.config)
        try:
            model.load_state_dict(loaded.state_dict, strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "mismatch"
            raise CheckpointError(f"{loaded.source}: weights do not match the config ({first})") from None
        loaded.state_dict.clear()  # the model owns the tensors now
        model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, loaded.tokenizer, Path(loaded.source), name=p.name,
                       chat_template=loaded.chat_template, bos_id=loaded.bos_id,
                       eos_ids=tuple(loaded.eos_ids), add_bos=loaded.add_bos,
                       generation_defaults=generation_defaults(loaded.generation, text))


# GGUF block types that septet's int4 / int8 layers hold without loss or nearly so: Q4_1
# re-quantises to itself exactly (its blocks span q = 0..15), Q4_0 to within its own step;
# 5- and 6-bit types lose nothing in 8 bits but the 0.5 bits of 5-bit ones would in 4.
_AUTO_INT4 = {"Q4_0", "Q4_1"}
_AUTO_INT8 = _AUTO_INT4 | {"Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


def native_quant(path: Path) -> str | None:
    """The quantisation a checkpoint already has: "int4" for a GGUF whose transformer
    matrices are all 4-bit blocks, "int8" for one whose matrices are 8-bit or below, else
    None (float files, HF and septet checkpoints). The embedding / output matrix is not
    counted: GGUF files keep it at higher precision (SmolLM2's Q4_1 file: Q8_0), and the
    quantised head is int8 anyway."""
    if path.suffix != ".gguf" or not path.is_file():
        return None
    from .checkpoints.gguf import read_gguf

    types = {t.type_name for t in read_gguf(path).tensors.values()
             if len(t.shape) == 2 and t.name.startswith("blk.")}
    if not types:
        return None
    if types <= _AUTO_INT4:
        return "int4"
    return "int8" if types <= _AUTO_INT8 else None


def _quantized(lm: LoadedModel, quant: str | None, group_size: int) -> LoadedModel:
    if quant:
        from .inference.quant import QuantPlan, quantize_model

        quantize_model(lm.model, QuantPlan(quant, group_size=group_size))
        _release_freed_memory()
    return lm


def _release_freed_memory() -> None:
    """Hand the float weights freed by quantisation back to the OS. glibc keeps freed
    small-block heap memory for reuse, so without this the process keeps the RSS of the
    unquantised model (docs/benchmarks.md)."""
    import gc

    from .inference.quant import malloc_trim

    gc.collect()
    malloc_trim()
