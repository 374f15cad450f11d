"""easy-VQA: the published sizes, captions recovered from questions (+ pixels), and the
frozen-encoder feature cache (computed once, then reused)."""

from __future__ import annotations

import collections
import time

import pytest
import torch
from torch import nn

from septet.data.easyvqa import (
    COLOURS,
    EXPECTED,
    FILL,
    N_ANSWERS,
    RGB,
    SHAPES,
    EasyVQA,
    _consistent,
    feature_cache,
    pixel_attributes,
)
from septet.data.images import Preprocess
from septet.errors import DataError


@pytest.fixture(scope="module")
def train(septet_home):
    return EasyVQA("train")


@pytest.fixture(scope="module")
def test_split(septet_home):
    return EasyVQA("test")


def test_published_sizes(train, test_split):
    for ds in (train, test_split):
        n_images, n_questions = EXPECTED[ds.split]
        assert len(ds) == n_questions
        assert ds.image_ids == list(range(n_images))
        assert len(list(ds.image_dir.glob("*.png"))) == n_images
        assert len(ds.answers) == N_ANSWERS
        assert set(ds.answers) == {"yes", "no", *COLOURS, *SHAPES}
    assert (len(train.image_ids), len(train)) == (4000, 38575)
    assert (len(test_split.image_ids), len(test_split)) == (1000, 9673)
    assert train.image(0).size == (64, 64)


def test_captions_agree_with_every_question(train):
    # image 0: "what is the blue shape?" -> rectangle
    assert train.caption(0) == "a blue rectangle"
    caps = [train.caption(i) for i in range(400)]
    assert len(set(caps)) == 24  # all colour x shape pairs occur
    for i in range(400):
        colour, shape = train.attributes(i)
        assert all(_consistent(q, colour, shape) for q in train.questions_for(i))
    # image 49's questions leave 5 pairs open; the pixels pick the blue circle
    assert len(train.candidates(49)) == 5 and train.caption(49) == "a blue circle"
    assert EasyVQA.all_captions()[:3] == ["a red circle", "a red rectangle", "a red triangle"]


def _check_pixel_rules(ds: EasyVQA, ids) -> int:
    checked = 0
    for i in ids:
        left = ds.candidates(i)
        if len(left) == 1:
            rgb, fill = pixel_attributes(ds.image_path(i))
            colour, shape = left[0]
            assert rgb == RGB[colour], (i, rgb, colour)
            assert min(FILL, key=lambda s: abs(fill - FILL[s])) == shape, (i, fill, shape)
            checked += 1
    return checked


def test_pixel_rules_agree_with_questions_sample(train):
    assert _check_pixel_rules(train, range(300)) > 250


@pytest.mark.slow
def test_pixel_rules_agree_with_questions_everywhere(train, test_split):
    """Every image whose questions pin (colour, shape): 3,578 train + 888 test."""
    assert _check_pixel_rules(train, train.image_ids) == 3578
    assert _check_pixel_rules(test_split, test_split.image_ids) == 888
    counts = collections.Counter(train.captions())
    assert len(counts) == 24 and min(counts.values()) > 100


def test_bad_split_and_damaged_copy(tmp_path, train):
    with pytest.raises(DataError, match="split 'val'"):
        EasyVQA("val")  # type: ignore[arg-type]
    (tmp_path / "answers.txt").write_text("\n".join(train.answers))
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "questions.json").write_text('[["what color is the shape?", "purple", 0]]')
    with pytest.raises(DataError, match="purple"):
        EasyVQA("test", tmp_path)
    (tmp_path / "test" / "questions.json").write_text(
        '[["what color is the shape?", "red", 0], ["is there a red shape?", "no", 0]]')
    with pytest.raises(DataError, match="contradict"):
        EasyVQA("test", tmp_path).caption(0)


# ------------------------------------------------------------------ feature cache


class TinyEncoder(nn.Module):
    """A stand-in frozen encoder: (B, 3, 16, 16) -> (B, 4, 8) tokens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.calls = 0

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(images).flatten(2).transpose(1, 2)


def test_feature_cache_is_computed_once_and_keyed(tmp_path, test_split):
    torch.manual_seed(0)
    enc = TinyEncoder()
    pre = Preprocess(size=16, resize=16)
    ids = [0, 1, 2, 3, 4]
    first = feature_cache(test_split, enc, encoder_name="tiny", preprocess=pre, image_ids=ids,
                          directory=tmp_path, batch_size=2)
    assert first.computed and enc.calls == 3 and first.tokens.shape == (5, 4, 8)
    assert first.tokens.dtype == torch.float16 and first.path.suffix == ".safetensors"
    assert list(tmp_path.iterdir()) == [first.path]  # no temp files left behind

    again = feature_cache(test_split, enc, encoder_name="tiny", preprocess=pre, image_ids=ids, directory=tmp_path)
    assert not again.computed and enc.calls == 3  # read back, encoder not run
    assert torch.equal(again.tokens, first.tokens)
    expected = enc.visual_tokens(pre.batch([test_split.image_path(3)]))
    assert torch.allclose(again.get([3]), expected.detach(), atol=2e-3)

    # another preprocessing, other weights, other images: each a different cache entry
    other_pre = feature_cache(test_split, enc, encoder_name="tiny", preprocess=Preprocess(size=16, resize=24),
                              image_ids=ids, directory=tmp_path)
    with torch.no_grad():
        enc.conv.bias.add_(1.0)
    other_w = feature_cache(test_split, enc, encoder_name="tiny", preprocess=pre, image_ids=ids, directory=tmp_path)
    other_ids = feature_cache(test_split, enc, encoder_name="tiny", preprocess=pre, image_ids=[5],
                              directory=tmp_path)
    assert other_pre.computed and other_w.computed and other_ids.computed
    assert len({first.path, other_pre.path, other_w.path, other_ids.path}) == 4

    # a corrupt cache file is recomputed, not trusted
    other_w.path.write_bytes(b"\x00" * 10)
    redo = feature_cache(test_split, enc, encoder_name="tiny", preprocess=pre, image_ids=ids, directory=tmp_path)
    assert redo.computed and torch.equal(redo.tokens, other_w.tokens)
    with pytest.raises(DataError, match="image id 5000"):
        feature_cache(test_split, enc, encoder_name="tiny", preprocess=pre, image_ids=[5000], directory=tmp_path)


def test_feature_cache_with_efficientnet(tmp_path, test_split):
    from septet.models.vision import load_efficientnet_lite0

    enc = load_efficientnet_lite0()
    pre = Preprocess(size=224, resize=224)
    f = feature_cache(test_split, enc, encoder_name="efficientnet-lite0", preprocess=pre, image_ids=[0, 1],
                      directory=tmp_path)
    assert f.computed and f.get([1, 0]).shape == (2, 49, 1280)
    g = feature_cache(test_split, enc, encoder_name="efficientnet-lite0", preprocess=pre, image_ids=[0, 1],
                      directory=tmp_path)
    assert not g.computed and torch.equal(g.tokens, f.tokens)


@pytest.mark.slow
def test_feature_cache_all_images_efficientnet(tmp_path, train, test_split):
    """All 5,000 images through EfficientNet-Lite0 at 224 x 224: prints images/s."""
    from septet.models.vision import load_efficientnet_lite0

    enc = load_efficientnet_lite0()
    pre = Preprocess(size=224, resize=224)
    for ds in (test_split, train):
        start = time.perf_counter()
        f = feature_cache(ds, enc, encoder_name="efficientnet-lite0", preprocess=pre, directory=tmp_path)
        took = time.perf_counter() - start
        print(f"{ds.split}: {len(f.image_ids)} images in {took:.0f} s = {len(f.image_ids) / took:.1f} images/s; "
              f"{f.path.stat().st_size / 2**20:.0f} MiB")
        assert f.tokens.shape == (len(ds.image_ids), 49, 1280)
        start = time.perf_counter()
        again = feature_cache(ds, enc, encoder_name="efficientnet-lite0", preprocess=pre, directory=tmp_path)
        print(f"{ds.split}: read back in {time.perf_counter() - start:.1f} s")
        assert not again.computed
