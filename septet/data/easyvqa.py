"""easy-VQA (Zhou 2020): 64 x 64 renders of one coloured shape, with templated questions.

    <asset dir>/answers.txt                 13 answers, one a line
    <asset dir>/{train,test}/questions.json [[question, answer, image_id], ...]
    <asset dir>/{train,test}/images/N.png   one image per id 0..N-1

Sizes: train 4,000 images / 38,575 questions, test 1,000 / 9,673; 13 answers (yes, no,
3 shapes, 8 colours). Each image shows exactly one shape, so its caption is "a {colour}
{shape}". The dataset does not ship the pair, so we recover it from the questions: every
question constrains (colour, shape) and the 24 candidates are filtered by all of them.
That pins 89% of the images; for the rest (e.g. only "is there a yellow shape?" -> no) the
pixels decide among the candidates left: the renderer paints the shape in one of eight
CSS colours (exact RGB values, see RGB) and a shape's fill of its bounding box separates
triangles (~0.53), circles (~0.83) and rectangles (~1.0). On every image the questions do
pin, these pixel rules agree with them (tests/test_easyvqa.py checks all 5,000).

Features of a frozen encoder are computed once per (encoder, weights, preprocessing,
image set) and cached as one safetensors file, written atomically (see `feature_cache`).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from septet.errors import DataError
from septet.fileio import atomic_path

from .images import Preprocess, load_image

COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
# the published sizes of easy-vqa==1.0, checked by the tests
EXPECTED = {"train": (4000, 38575), "test": (1000, 9673)}
N_ANSWERS = 13

# the renderer's colours, measured on the question-determined images: always exactly these
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
       "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0)}
# typical fill of the bounding box (measured medians; min/max triangle 0.50/0.63,
# circle 0.74/0.91, rectangle 0.96/1.0)
FILL = {"triangle": 0.53, "circle": 0.83, "rectangle": 1.0}

_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")
_NEGATED_RE = re.compile(r"\b(not|no)\b")


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    image_id: int


def _consistent(q: Question, colour: str, shape: str) -> bool:
    """Is `q`'s answer true of an image showing a `colour` `shape`?"""
    c = _COLOUR_RE.search(q.text)
    s = _SHAPE_RE.search(q.text)
    if q.answer in ("yes", "no"):
        # "is there (not) a {colour} shape / a {shape} ...?"; "is no ... present?"
        present = (c.group(1) == colour) if c else (s is not None and s.group(1) == shape)
        negated = _NEGATED_RE.search(q.text) is not None
        return (q.answer == "yes") == (present != negated)
    if q.answer in COLOURS:  # "what color is the {shape} / the shape?"
        return q.answer == colour and (s is None or s.group(1) == shape)
    if q.answer in SHAPES:  # "what is the {colour} shape?", "what shape is present?"
        return q.answer == shape and (c is None or c.group(1) == colour)
    return False


class EasyVQA:
    """One split: `questions`, `answers` (the 13, file order), `image_ids` (sorted).

    EasyVQA("train") reads the fetched `easy-vqa` asset; `root` points at another copy."""

    def __init__(self, split: Literal["train", "test"], root: str | Path | None = None):
        if split not in EXPECTED:
            raise DataError(f"easy-VQA split {split!r} is unknown; use 'train' or 'test'")
        if root is None:
            from septet.assets import fetch

            root = fetch("easy-vqa", quiet=True)
        self.root = Path(root)
        self.split = split
        self.answers = self._read_answers(self.root / "answers.txt")
        self.questions = self._read_questions(self.root / split / "questions.json")
        self.image_dir = self.root / split / "images"
        self.image_ids = sorted({q.image_id for q in self.questions})
        self._by_image: dict[int, list[Question]] = {i: [] for i in self.image_ids}
        for q in self.questions:
            self._by_image[q.image_id].append(q)
        self._attributes: dict[int, tuple[str, str]] = {}  # filled lazily

    # ------------------------------------------------------------------ reading

    @staticmethod
    def _read_answers(path: Path) -> list[str]:
        if not path.is_file():
            raise DataError(f"{path} is missing; run `septet fetch easy-vqa`")
        answers = [a.strip() for a in path.read_text(encoding="utf-8").splitlines() if a.strip()]
        if len(set(answers)) != len(answers) or not answers:
            raise DataError(f"{path} must list distinct answers, one a line; re-fetch easy-vqa")
        return answers

    def _read_questions(self, path: Path) -> list[Question]:
        if not path.is_file():
            raise DataError(f"{path} is missing; run `septet fetch easy-vqa`")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e}); re-fetch easy-vqa") from None
        if not isinstance(rows, list):
            raise DataError(f"{path} must hold a list of [question, answer, image_id]")
        known = set(self.answers)
        out = []
        for i, row in enumerate(rows):
            ok = (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                  and isinstance(row[1], str) and isinstance(row[2], int) and row[2] >= 0)
            if not ok:
                raise DataError(f"{path} entry {i} is {row!r}; expected [question, answer, image_id]")
            if row[1] not in known:
                raise DataError(f"{path} entry {i} has answer {row[1]!r}, not in answers.txt")
            out.append(Question(row[0], row[1], row[2]))
        return out

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> Question:
        return self.questions[i]

    def questions_for(self, image_id: int) -> list[Question]:
        return self._by_image[image_id]

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / f"{image_id}.png"

    def image(self, image_id: int) -> Image.Image:
        """The RGB PIL image (64 x 64)."""
        return load_image(self.image_path(image_id))

    def attributes(self, image_id: int) -> tuple[str, str]:
        """(colour, shape) of the one shape in the image, recovered from its questions."""
        if image_id not in self._attributes:
            if image_id not in self._by_image:
                raise DataError(f"image id {image_id} is not in easy-VQA {self.split}")
            self._attributes[image_id] = self._solve(image_id)
        return self._attributes[image_id]

    def caption(self, image_id: int) -> str:
        colour, shape = self.attributes(image_id)
        return f"a {colour} {shape}"

    def captions(self) -> list[str]:
        """Captions of all images, in `image_ids` order."""
        return [self.caption(i) for i in self.image_ids]

    @staticmethod
    def all_captions() -> list[str]:
        """The 24 possible captions (a fixed order: colour-major)."""
        return [f"a {c} {s}" for c in COLOURS for s in SHAPES]

    def candidates(self, image_id: int) -> list[tuple[str, str]]:
        """The (colour, shape) pairs consistent with every question about the image."""
        qs = self._by_image[image_id]
        return [(c, s) for c in COLOURS for s in SHAPES if all(_consistent(q, c, s) for q in qs)]

    def _solve(self, image_id: int) -> tuple[str, str]:
        left = self.candidates(image_id)
        if not left:
            raise DataError(f"{self.root / self.split / 'questions.json'}: the questions about image "
                            f"{image_id} contradict each other; the dataset copy is damaged, re-fetch easy-vqa")
        if len(left) == 1:
            return left[0]
        rgb, fill = pixel_attributes(self.image_path(image_id))
        colour = min({c for c, _ in left}, key=lambda c: _rgb_distance(rgb, RGB[c]))
        shape = min({s for c, s in left if c == colour} or {"?"}, key=lambda s: abs(fill - FILL.get(s, 9.0)))
        if (colour, shape) not in left or _rgb_distance(rgb, RGB[colour]) > 30:
            raise DataError(f"{self.image_path(image_id)}: its shape's colour {rgb} matches none of "
                            f"{sorted({c for c, _ in left})}; the dataset copy is damaged, re-fetch easy-vqa")
        return colour, shape


def _rgb_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    return sum(abs(x - y) for x, y in zip(a, b))


def pixel_attributes(path: Path) -> tuple[tuple[int, int, int], float]:
    """(the shape's RGB, its fill of its bounding box) read from a rendered image.

    The background is the most common border colour; shape pixels are those farther from
    it than half the largest distance (the anti-aliased rim splits either way); the colour
    is the median of the core pixels (>= 90% of the largest distance), which are never
    blended with the background."""
    a = np.asarray(load_image(path), dtype=np.int64)  # (H, W, 3)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # (4·S, 3)
    values, counts = np.unique(border, axis=0, return_counts=True)
    background = values[counts.argmax()]
    dist = np.abs(a - background).sum(-1)  # (H, W)
    if dist.max() == 0:
        raise DataError(f"{path} is blank: no shape differs from the background")
    mask = dist > dist.max() / 2
    ys, xs = np.nonzero(mask)
    fill = float(mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    core = a[dist >= 0.9 * dist.max()]
    rgb = tuple(int(v) for v in np.median(core, axis=0).round())
    return rgb, fill  # type: ignore[return-value]


# ====================================================================== feature cache

# EfficientNet-Lite0 on easy-VQA: the whole 64 x 64 render upsampled to 224 (no crop: the
# shape may touch the border), mean = std = 0.5 -> a 7 x 7 grid of 1280-d tokens.
LITE0_PREPROCESS = Preprocess(size=224, resize=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def weights_hash(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), 16 hex digits:
    a cache computed with other weights can never be mistaken for this one's."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class Features:
    """Cached visual tokens: `tokens` (N, T, D) in the stored dtype; `index` image id -> row."""

    tokens: torch.Tensor
    image_ids: list[int]
    path: Path
    computed: bool  # True when this call ran the encoder, False when read from the cache

    def __post_init__(self) -> None:
        self.index = {i: r for r, i in enumerate(self.image_ids)}

    def get(self, image_ids: Sequence[int]) -> torch.Tensor:
        """(B, T, D) float32 tokens of these images."""
        rows = torch.tensor([self.index[i] for i in image_ids])
        return self.tokens[rows].float()


def cache_dir() -> Path:
    from septet.assets import cache_root

    return cache_root() / "features"


def feature_cache(
    dataset: EasyVQA,
    encoder: nn.Module,
    *,
    encoder_name: str,
    preprocess: Preprocess,
    image_ids: Sequence[int] | None = None,
    directory: str | Path | None = None,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float16,
    progress: bool = False,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Features:
    """The frozen encoder's visual tokens for `image_ids` (default: all) of `dataset`.

    Computed once, then read back: the file name hashes encoder_name, the weights hash,
    preprocess.key(), the split and the id list, and the same facts are stored in the
    file's metadata and re-checked on reading. `encode` defaults to encoder.visual_tokens
    and must map (B, 3, S, S) -> (B, T, D). Tokens are stored as float16 by default: the
    full train split of EfficientNet-Lite0 (4,000 x 49 x 1280) is 0.5 GB that way, and its
    ReLU6 outputs lie in [0, 6], well inside fp16's precision.
    """
    ids = list(dataset.image_ids if image_ids is None else image_ids)
    missing = [i for i in ids if i not in dataset._by_image]
    if missing:
        raise DataError(f"image id {missing[0]} is not in easy-VQA {dataset.split}")
    meta = {
        "encoder": encoder_name,
        "weights": weights_hash(encoder),
        "preprocess": preprocess.key(),
        "dataset": f"easy-vqa/{dataset.split}",
        "image_ids": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16],
        "dtype": str(dtype).removeprefix("torch."),
    }
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", encoder_name)
    path = Path(directory or cache_dir()) / f"easy-vqa-{dataset.split}-{safe_name}-{digest}.safetensors"

    cached = _read_cache(path, meta, len(ids))
    if cached is not None:
        return Features(cached, ids, path, computed=False)

    encode = encode or encoder.visual_tokens
    was_training = encoder.training
    encoder.eval()
    chunks, start = [], time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(ids), batch_size):
            batch = preprocess.batch([dataset.image_path(i) for i in ids[b:b + batch_size]])
            chunks.append(encode(batch).to(dtype).cpu())  # (b, T, D)
            if progress:
                done = min(b + batch_size, len(ids))
                rate = done / (time.perf_counter() - start)
                print(f"\rencoding easy-VQA {dataset.split} with {encoder_name}: {done}/{len(ids)} "
                      f"({rate:.1f} images/s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    encoder.train(was_training)
    tokens = torch.cat(chunks)  # (N, T, D)
    with atomic_path(path) as tmp:
        save_file({"tokens": tokens.contiguous(), "image_ids": torch.tensor(ids, dtype=torch.int64)},
                  str(tmp), metadata=meta)
    return Features(tokens, ids, path, computed=True)


def _read_cache(path: Path, meta: dict[str, str], n: int) -> torch.Tensor | None:
    """The cached tokens if `path` holds exactly what `meta` describes; None means
    "compute again" (absent, or unreadable: the rewrite replaces it atomically)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}) != meta:
                return None
            tokens = f.get_tensor("tokens")
    except Exception:  # a corrupt cache is recomputed, never trusted
        return None
    return tokens if tokens.shape[0] == n else None


__all__ = ["COLOURS", "EXPECTED", "EasyVQA", "FILL", "Features", "LITE0_PREPROCESS", "N_ANSWERS", "Question", "RGB",
           "SHAPES", "cache_dir", "feature_cache", "pixel_attributes", "weights_hash"]
