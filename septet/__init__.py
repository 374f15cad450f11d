"""septet: the seven landmark language models of 2023 in one PyTorch system."""

__version__ = "0.1.0"
