"""Loading and exporting checkpoints in other formats: GGUF, HF directories, Meta .pth.

Every loader returns a `Loaded`: a septet config, a state dict in septet's own parameter
names and layouts (RoPE in the 'half' layout HF uses), and the tokenizer and chat template
the checkpoint carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import DecoderConfig
from ..tokenizer import Tokenizer


@dataclass
class Loaded:
    config: DecoderConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None = None
    chat_template: str | None = None  # jinja2 source, rendered in a sandbox
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()  # any of these ends a generation
    add_bos: bool = False  # prepend bos_id when encoding a prompt
    source: str = ""  # the file or directory it came from
    metadata: dict = field(default_factory=dict)  # format-specific extras, for reports
    generation: dict = field(default_factory=dict)  # sampling values the file recommends (generation_config)
