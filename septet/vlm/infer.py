"""A trained VLM bridge in use: load a checkpoint, answer questions about images, caption.

A VLM checkpoint (written by septet.vlm.train) is a septet checkpoint directory holding only
the bridge's weights; config.json names the rest:

    {"family": "septet-vlm", "arch": "flamingo" | "blip2", "lm": "smollm2-135m-instruct",
     "vision": "efficientnet-lite0", "bridge": {FlamingoConfig or Blip2Config fields}}

The frozen LM is loaded by name (septet.load) and the frozen encoder from the registry
below, so a checkpoint is a few tens of MB, not the LM's hundreds.

Scoring answers: easy-VQA answers come from a closed set, so besides free generation
(beam search, as the papers decode open-ended VQA) `VLM.rank` scores every candidate by its
log-likelihood after the prompt (Flamingo's protocol for closed-ended tasks). The prompt
is run once into a KV cache; candidates are scored as right-padded rows continuing it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from septet.errors import CheckpointError, ConfigError
from septet.inference import DecodeBatch
from septet.models.blip2 import Blip2, Blip2Config, Blip2Stage1
from septet.models.flamingo import Flamingo, FlamingoConfig, add_media_tokens

from .data import CAPTION_PROMPT, Formatter

FAMILY = "septet-vlm"
NORM_MEAN, NORM_STD = "feature_norm.mean", "feature_norm.std"  # stored beside the bridge weights
ARCHS = ("flamingo", "blip2")


@dataclass(frozen=True)
class VisionSpec:
    d_visual: int
    load: Callable[[], nn.Module]  # -> a frozen encoder with visual_tokens(images) -> (B, N, D)
    preprocess: Callable[[], object]  # -> septet.data.images.Preprocess


def _lite0() -> nn.Module:
    from septet.models.vision import load_efficientnet_lite0

    return load_efficientnet_lite0()


def _lite0_preprocess():
    from septet.data.easyvqa import LITE0_PREPROCESS

    return LITE0_PREPROCESS


# frozen encoders a checkpoint may name (tests register a tiny one)
VISION: dict[str, VisionSpec] = {"efficientnet-lite0": VisionSpec(1280, _lite0, _lite0_preprocess)}


def vision_spec(name: str) -> VisionSpec:
    if name not in VISION:
        raise ConfigError(f"vision encoder {name!r} is unknown; use one of {', '.join(VISION)}")
    return VISION[name]


class Blip2Bridge(nn.Module):
    """Stage 1 (Q-Former + ITC/ITM/ITG heads) and stage 2 (the same Q-Former + projection
    into the frozen LM) in one module, so one checkpoint serves retrieval and generation."""

    def __init__(self, lm: nn.Module, config: Blip2Config):
        super().__init__()
        self.stage1 = Blip2Stage1(config)
        self.model = Blip2(lm, config, self.stage1)

    def bridge_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"stage1.{k}": v for k, v in self.stage1.state_dict().items()}
        state.update({f"proj.{k}": v for k, v in self.model.proj.state_dict().items()})
        return state

    def load_bridge_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.bridge_state_dict()):
            raise CheckpointError("BLIP-2 bridge weights do not match this config; was it trained with another LM?")
        self.stage1.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("stage1.")})
        self.model.proj.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("proj.")})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_bridge(arch: str, bridge: dict, lm: nn.Module) -> nn.Module:
    if arch == "flamingo":
        return Flamingo(lm, FlamingoConfig.from_dict(bridge))
    if arch == "blip2":
        return Blip2Bridge(lm, Blip2Config.from_dict(bridge))
    raise ConfigError(f"--arch {arch!r} is unknown; use flamingo or blip2")


class VLM:
    """A bridge + its frozen LM and tokenizer, ready to score and generate.

    `features` (1, N, D) come from the frozen encoder (`encode_image` computes them)."""

    def __init__(self, arch: str, bridge: nn.Module, tokenizer, *, eos_id: int, vision: str = "efficientnet-lite0",
                 feature_norm: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.arch, self.bridge, self.vision = arch, bridge.eval(), vision
        self.feature_norm = feature_norm  # (mean (D,), std (D,)) or None: see data.StandardizedFeatures
        if arch == "flamingo":
            self.tokenizer = add_media_tokens(tokenizer, bridge.lm.config.vocab_size)
            self.fmt = Formatter(self.tokenizer.encode, image_id=bridge.image_token_id,
                                 eoc_id=bridge.eoc_token_id, eos_id=eos_id)
        else:
            self.tokenizer = tokenizer
            self.fmt = Formatter(tokenizer.encode, image_id=None, eoc_id=None, eos_id=eos_id)
        self._encoder = None

    @property
    def lm(self) -> nn.Module:
        return self.bridge.lm if self.arch == "flamingo" else self.bridge.model.lm

    # --- images -------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        """A path (PNG/JPEG, any size), PIL image or uint8 array -> features (1, N, D)."""
        spec = vision_spec(self.vision)
        if self._encoder is None:
            self._encoder = spec.load()
        x = spec.preprocess()(image)  # (3, S, S)
        return self.standardize(self._encoder.visual_tokens(x[None]).float())

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        if self.feature_norm is None:
            return features
        mean, std = self.feature_norm
        return (features - mean) / std

    def view(self, data):
        """A data split as this bridge sees it (features standardized if it was trained so)."""
        from .data import standardized

        return data if self.feature_norm is None else standardized(data, *self.feature_norm)

    # --- scoring ------------------------------------------------------------------
    @torch.no_grad()
    def prefix_batch(self, prefix: list[int], media: torch.Tensor | None) -> DecodeBatch:
        """Run a prompt prefix (with its image) once, as a one-row batch that `rank`
        continues in many rows."""
        ids = torch.tensor([prefix])
        if self.arch == "flamingo":
            bridge = self.bridge
            visual = None if media is None else bridge.resample(media)  # (1, M, R, D)
            return DecodeBatch.conditioned(
                bridge, lambda cache: bridge(ids, visual=visual, cache=cache, last_only=True)[:, -1],
                rows=1, slots=len(prefix), budget=0, new_cache=bridge.new_cache,
                row_inputs={} if visual is None else {"visual": visual})
        model = self.bridge.model  # the soft prompt, then the prefix
        return DecodeBatch.conditioned(self.lm, lambda cache: model(media, ids, cache=cache, last_only=True)[:, -1],
                                       rows=1, slots=model.config.qformer.n_query + len(prefix), budget=0)

    @torch.no_grad()
    def rank(self, prefix: DecodeBatch, questions: list[list[int]], candidates: list[list[int]]) -> torch.Tensor:
        """Log-likelihood (Q, C) of each candidate continuing prefix + question q.

        Rows continue the cached prefix: row = question + the candidate's tokens but the
        last; right-padding never leaks backwards under the causal mask."""
        rows, where = [], []  # where[(q, c)] = (row, first position of the candidate)
        multi = [c for c, toks in enumerate(candidates) if len(toks) > 1]
        for qi, q in enumerate(questions):
            base = len(rows)
            for c in multi or [None]:
                rows.append(q + (candidates[c][:-1] if c is not None else []))
            for ci, toks in enumerate(candidates):
                r = base + (multi.index(ci) if ci in multi else 0)
                where.append((qi, ci, r, len(q) - 1, toks))
        T = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
        rows_of_prefix = prefix.fork([0] * len(rows), extra_slots=T)  # R copies of the prefix
        logp = rows_of_prefix.extend(tokens, all_logits=True).float().log_softmax(-1)  # (R, T, V)
        out = torch.zeros(len(questions), len(candidates))
        for qi, ci, r, start, toks in where:
            out[qi, ci] = sum(logp[r, start + j, t].item() for j, t in enumerate(toks))
        return out

    # --- user-facing --------------------------------------------------------------
    def _prompt(self, text_ids: list[int], features: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        if self.arch == "flamingo":
            return [self.bridge.image_token_id] + text_ids, features[:, None, None]  # (1, 1, 1, N, D)
        return text_ids, features

    @torch.no_grad()
    def answer(self, features: torch.Tensor, question: str, *, beams: int | None = None,
               choices: Sequence[str] | None = None, max_new_tokens: int = 8) -> str:
        """Free generation by beam search (Flamingo 3 beams, BLIP-2 5), or, with `choices`,
        the highest-likelihood choice."""
        prompt, media = self._prompt(self.fmt.question(question), features)
        if choices:
            answers = [self.fmt.answer(c) for c in choices]
            scores = self.rank(self.prefix_batch(prompt[:1], media), [prompt[1:]], answers)
            return choices[int(scores[0].argmax())]
        return self._generate(prompt, media, beams, max_new_tokens)

    @torch.no_grad()
    def caption(self, features: torch.Tensor, *, beams: int | None = None, max_new_tokens: int = 12) -> str:
        text = [] if self.arch == "flamingo" else self.fmt.encode(CAPTION_PROMPT)
        prompt, media = self._prompt(text, features)
        return self._generate(prompt, media, beams, max_new_tokens)

    def _generate(self, prompt: list[int], media: torch.Tensor, beams: int | None, max_new_tokens: int) -> str:
        if self.arch == "flamingo":
            ids = self.bridge.generate(prompt, media, beams=beams or 3, max_new_tokens=max_new_tokens)
        else:
            ids = self.bridge.model.generate(media, prompt, beams=beams or 5, max_new_tokens=max_new_tokens,
                                             stop_ids=[self.fmt.eos_id])
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def eos_id_of(loaded) -> int:
    """The LM's end-of-text id: its declared EOS, else the tokenizer's end-of-text."""
    return loaded.eos_ids[0] if loaded.eos_ids else loaded.tokenizer.eot_id


def load_vlm(path: str | Path, *, lm=None) -> VLM:
    """A VLM checkpoint (or a run directory: its newest checkpoint) -> VLM. `lm` overrides
    the LoadedModel named in the checkpoint (tests pass a tiny one)."""
    from septet.api import load, resolve_checkpoint
    from septet.checkpoints.native import load_checkpoint

    p = resolve_checkpoint(path)
    ckpt = load_checkpoint(p)
    c = ckpt.config
    if c.get("family") != FAMILY or c.get("arch") not in ARCHS:
        raise CheckpointError(f"{p} is not a VLM checkpoint (config.json family {c.get('family')!r}); "
                              "pass a directory written by `septet vlm train`")
    loaded = lm or load(c["lm"])
    bridge = build_bridge(c["arch"], c["bridge"], loaded.model)
    state = dict(ckpt.model_state)
    norm = None
    if c.get("feature_norm"):
        norm = (state.pop(NORM_MEAN), state.pop(NORM_STD))
    bridge.load_bridge_state_dict(state)
    return VLM(c["arch"], bridge, loaded.tokenizer, eos_id=eos_id_of(loaded), vision=c["vision"], feature_norm=norm)


def is_vlm_checkpoint(path: str | Path) -> bool:
    """Whether `path` (a checkpoint or run directory) holds a VLM checkpoint."""
    from septet.checkpoints.native import latest_checkpoint

    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        p = latest_checkpoint(p) or p
    try:
        return json.loads((p / "config.json").read_text(encoding="utf-8")).get("family") == FAMILY
    except (OSError, ValueError, AttributeError):
        return False


__all__ = ["ARCHS", "Blip2Bridge", "FAMILY", "VISION", "VLM", "VisionSpec", "build_bridge", "eos_id_of",
           "is_vlm_checkpoint", "load_vlm", "vision_spec"]
