"""septet: the seven landmark language models of 2023 in one PyTorch system."""

__version__ = "0.1.0"


def load(name_or_path, **kwargs):
    """Load a septet checkpoint, a training run directory, or a preset (random weights).

    Returns an object with `.model` (logits = model(tokens (B, T))), `.tokenizer` and
    `.generate(prompt, ...)`.
    """
    from .api import load as _load

    return _load(name_or_path, **kwargs)
