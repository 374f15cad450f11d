"""transformers as an independent reference for GGUF models (shared by the parity tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def hf_model_from_gguf(path: Path):
    """transformers' own GGUF reader, dequantizer and un-permutation, in fp32.
    `from_pretrained(gguf_file=...)` needs `accelerate`; without it the same loader pieces
    are called directly."""
    transformers = pytest.importorskip("transformers")
    d, n = str(path.parent), path.name
    try:
        import accelerate  # noqa: F401

        return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=n, dtype=torch.float32).eval()
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        cfg = transformers.AutoConfig.from_pretrained(d, gguf_file=n)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        model.tie_weights()
        return model
