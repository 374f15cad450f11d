"""Tiny stand-ins for the VLM tests: a BPE tokenizer and a 2-layer LLaMA saved as a septet
checkpoint (so `septet.load(path)` finds it by name, like smollm2), a random 'encoder'
registered as the `tiny-test` vision model, and a synthetic easy-VQA whose features carry
each image's colour and shape."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from septet.checkpoints.native import save_checkpoint
from septet.data.easyvqa import COLOURS, SHAPES, Question
from septet.data.images import Preprocess
from septet.models import build, get_preset
from septet.tokenizer import Tokenizer
from septet.vlm import data as D
from septet.vlm.infer import VISION, VisionSpec

D_VIS = 16
N_TOK = 4


class TinyEncoder(nn.Module):
    """(B, 3, 16, 16) -> (B, 4, 16): 2 x 2 average pool, then a fixed random linear map."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(3, D_VIS, generator=g), requires_grad=False)

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(images, 2).flatten(2).transpose(1, 2)  # (B, 4, 3)
        return x @ self.proj


VISION["tiny-test"] = VisionSpec(D_VIS, TinyEncoder, lambda: Preprocess(size=16, resize=16))


class TableFeatures:
    def __init__(self, table: dict[int, torch.Tensor]):
        self.table = table

    def get(self, ids):
        return torch.stack([self.table[i] for i in ids])  # (B, N, D)


def synthetic_vqa(n_images: int = 24, seed: int = 0, offset: int = 0) -> D.VQAData:
    """Images whose features are a colour prototype plus a shape prototype plus noise."""
    g = torch.Generator().manual_seed(123)
    colour_p = torch.randn(len(COLOURS), D_VIS, generator=g)
    shape_p = torch.randn(len(SHAPES), D_VIS, generator=g)
    g = torch.Generator().manual_seed(seed)
    questions, captions, table = [], {}, {}
    for k in range(n_images):
        i = offset + k
        c, s = COLOURS[k % len(COLOURS)], SHAPES[(k // len(COLOURS)) % len(SHAPES)]
        captions[i] = f"a {c} {s}"
        base = colour_p[COLOURS.index(c)] + shape_p[SHAPES.index(s)]
        table[i] = base + 0.1 * torch.randn(N_TOK, D_VIS, generator=g)
        questions += [Question("what color is the shape?", c, i), Question("what shape is this?", s, i),
                      Question("is there a red shape?", "yes" if c == "red" else "no", i)]
    answers = list(COLOURS) + list(SHAPES) + ["yes", "no"]
    return D.VQAData(questions, captions, TableFeatures(table), answers)


def tiny_tokenizer() -> Tokenizer:
    texts = [D.VQA_TEMPLATE.format(q) for q in ("what color is the shape?", "what shape is this?",
                                                 "is there a red shape?")]
    texts += [f"a {c} {s}" for c in COLOURS for s in SHAPES] + [D.CAPTION_PROMPT, "yes no"]
    return Tokenizer.train_bpe(texts * 5, 300)


def tiny_lm_dir(root: Path) -> Path:
    """A 2-layer LLaMA (tied head, random weights) + tokenizer as a septet checkpoint."""
    tok = tiny_tokenizer()
    cfg = get_preset("llama-tiny").config.replace(n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                                                  vocab_size=tok.vocab_size, context=256)
    torch.manual_seed(0)
    lm = build(cfg)
    path = root / "tiny-lm"
    save_checkpoint(path, model_state=lm.state_dict(), config=cfg.to_dict(), tokenizer_json=tok.to_json_str())
    return path


def tiny_train_config(arch: str, lm_dir: Path, out: Path, **changes):
    from septet.vlm.train import VLMTrainConfig

    base = dict(arch=arch, lm=str(lm_dir), vision="tiny-test", out=out, steps=3, stage1_steps=2, lr=3e-3,
                warmup=1, vqa_batch=4, caption_batch=2, interleaved_batch=2, interleaved_images=2,
                stage1_batch=4, n_latents=4, resampler_layers=1, resampler_dim=32, xattn_every=1, ff_mult=1,
                qformer_dim=32, qformer_layers=2, n_query=2, eval_every=2, eval_questions=4, ckpt_every=2,
                progress=False)
    base.update(changes)
    return VLMTrainConfig(**base)
