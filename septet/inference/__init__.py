"""Inference: everything between a loaded model and the tokens it produces.

- `engine`: `DecodeBatch`, the one batch engine (padding, cache, prefill, step, rows
  leaving and joining) that every decoding caller drives
- `steps/`: the one-token step in three implementations (eager, fused, compiled)
- `kv_cache`: the cache the engine allocates, with septet's decode-attention kernel
- `sampling`: `Sampling` and the per-row sampler; `text`: ids to text with stop strings
- `generate`: one prompt streamed, or many together; `beam`: beam search
- `repetition`: detects a reply caught in a loop (chat and the server stop on it)
- `quant/`: weight-only quantisation (`QuantPlan`, `quantize_model`, `QuantizeOnLoad`)

The package knows nothing of tokenization: it takes and gives token ids (`text` turns
them into text for callers that hold a tokenizer).
"""

from .beam import beam_search, gnmt_penalty, power_penalty
from .engine import DecodeBatch, cache_slots, check_prompt, left_pad, new_token_budget, optimize_for_inference
from .generate import generate_batch, generate_batch_with_logits, generate_ids
from .sampling import RowSampler, Sampling, filter_logits, sample_next
from .steps import decode_path, decode_step
from .text import TextStream, stream_text

__all__ = ["DecodeBatch", "RowSampler", "Sampling", "TextStream", "beam_search", "cache_slots", "check_prompt",
           "decode_path", "decode_step", "filter_logits", "generate_batch", "generate_batch_with_logits",
           "generate_ids", "gnmt_penalty", "left_pad", "new_token_budget", "optimize_for_inference",
           "power_penalty", "sample_next", "stream_text"]
