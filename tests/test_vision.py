"""Vision encoders and image loading: EfficientNet-Lite0 (real ImageNet weights on real
photos), the from-scratch ViT, and septet.data.images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from septet.data.images import Preprocess, load_image
from septet.errors import CheckpointError, DataError, InputError
from septet.models.vision import (
    EFFICIENTNET_LITE0_PREPROCESS,
    IMAGENET_NAMES,
    EfficientNetLite,
    ViT,
    ViTConfig,
    load_efficientnet_lite0,
    map_efficientnet_state,
    same_pad,
)


@pytest.fixture(scope="module")
def lite0_file(septet_home):
    from septet import assets

    return assets.asset_file("efficientnet-lite0", "*.pth", progress=False, quiet=True)


@pytest.fixture(scope="module")
def lite0(lite0_file):
    return load_efficientnet_lite0(lite0_file)


# ------------------------------------------------------------------ EfficientNet-Lite0


@pytest.mark.parametrize("size,kernel,stride", [(224, 3, 2), (225, 3, 2), (112, 5, 2), (7, 3, 1), (64, 5, 1)])
def test_same_pad_gives_ceil_output(size, kernel, stride):
    x = torch.zeros(1, 1, size, size)
    y = torch.nn.functional.conv2d(same_pad(x, kernel, stride), torch.zeros(1, 1, kernel, kernel), stride=stride)
    assert y.shape[-1] == -(-size // stride)
    if size % 2 == 0 and stride == 2 and kernel == 3:  # TF: the odd pixel goes right/bottom
        assert same_pad(x, kernel, stride).shape[-1] == size + 1


def test_lite0_architecture_and_token_grid():
    m = EfficientNetLite().eval()
    assert sum(p.numel() for p in m.parameters()) == 4_652_008  # the released file's count
    assert len(m.blocks) == 16
    assert not any("se" in n.split(".")[-2:] for n, _ in m.named_modules())  # Lite: no squeeze-excite
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        grid = m.features(x)
        assert grid.shape == (1, 1280, 7, 7)
        tokens = m.visual_tokens(x)
        assert tokens.shape == (1, 49, 1280)
        assert torch.equal(tokens[:, 8], grid[:, :, 1, 1])  # row-major: token 8 = (1, 1)
        small = torch.randn(2, 3, 64, 64)  # any size works
        assert m.features(small).shape == (2, 1280, 2, 2)
        assert m(small).shape == (2, 1000)


def test_lite0_real_weights_classify_real_photos(lite0):
    """ImageNet top-1 on scikit-image's photos: chelsea is a cat, coffee an espresso/cup."""
    skdata = pytest.importorskip("skimage.data")
    x = EFFICIENTNET_LITE0_PREPROCESS.batch([skdata.chelsea(), skdata.coffee()])
    assert x.shape == (2, 3, 224, 224)
    with torch.inference_mode():
        probs = lite0(x).softmax(-1)
        feats = lite0.features(x)
    top = probs.argmax(-1).tolist()
    print("top-1:", [(i, IMAGENET_NAMES.get(i, "?"), round(float(probs[k, i]), 3)) for k, i in enumerate(top)])
    assert top[0] in range(281, 286), top  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top[1] in (967, 968, 504), top  # espresso / cup / coffee mug
    assert feats.shape == (2, 1280, 7, 7)
    assert float(feats.min()) >= 0.0 and float(feats.max()) <= 6.0  # the head's ReLU6
    assert not any(p.requires_grad for p in lite0.parameters())


def test_lite0_batchnorm_folding_is_exact():
    torch.manual_seed(0)
    m = EfficientNetLite().eval()
    for bn in (b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)):  # non-trivial statistics
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        assert torch.allclose(m.fold_batchnorm()(x), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="eval mode"):
        EfficientNetLite().train().fold_batchnorm()


def test_lite0_weight_mapping_names_the_bad_key(lite0_file):
    state = torch.load(lite0_file, map_location="cpu", weights_only=True)
    model = EfficientNetLite()
    assert set(map_efficientnet_state(model, state, "f")) == set(model.state_dict())

    bad = dict(state)
    bad["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    with pytest.raises(CheckpointError, match=r"_blocks\.3\._depthwise_conv\.weight.*\(144, 1, 3, 3\).*"
                                              r"expected \(144, 1, 5, 5\)"):
        map_efficientnet_state(model, bad, "f")
    extra = dict(state, **{"_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)})
    with pytest.raises(CheckpointError, match="_se_reduce"):
        map_efficientnet_state(model, extra, "f")
    missing = {k: v for k, v in state.items() if k != "_fc.bias"}
    with pytest.raises(CheckpointError, match="classifier.bias"):
        map_efficientnet_state(model, missing, "f")


def test_lite0_loader_rejects_a_non_weights_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip or pickle")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_efficientnet_lite0(junk)


# ------------------------------------------------------------------ ViT


def test_vit_token_grid_cls_and_bidirectional():
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, n_layer=2, d_model=32, n_head=4)
    vit = ViT(cfg)
    x = torch.randn(2, 3, 32, 32)
    tokens = vit(x)
    assert tokens.shape == (2, 1 + 16, 32)
    assert vit.pool(tokens).shape == (2, 32)
    # bidirectional: changing the last patch changes the [CLS] and the first patch's outputs
    y = x.clone()
    y[:, :, 24:, 24:] += 1.0
    out = vit(y)
    assert not torch.allclose(out[:, 0], tokens[:, 0])
    assert not torch.allclose(out[:, 1], tokens[:, 1])
    tokens.sum().backward()
    assert vit.patch_embed.weight.grad is not None and vit.cls_emb.grad is not None

    no_cls = ViT(ViTConfig(image_size=32, patch_size=8, n_layer=1, d_model=32, n_head=4, cls_token=False))
    assert no_cls.visual_tokens(x).shape == (2, 16, 32)
    with pytest.raises(InputError, match="size=32"):
        vit(torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------ images


def _save(tmp_path, name: str, img: Image.Image, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_images_any_size_and_format(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 91, 3), dtype=np.uint8))
    paths = [
        _save(tmp_path, "a.png", rgb),
        _save(tmp_path, "b.jpg", rgb, quality=90),
        _save(tmp_path, "c.png", rgb.convert("L")),  # greyscale
        _save(tmp_path, "d.png", rgb.convert("RGBA")),
        _save(tmp_path, "e.png", rgb.convert("P")),  # palette
        _save(tmp_path, "f.jpeg", Image.new("RGB", (500, 20), (10, 20, 30))),  # extreme aspect
    ]
    for p in paths:
        assert load_image(p).mode == "RGB"
    pre = Preprocess(size=224, resize=256)
    batch = pre.batch(paths)
    assert batch.shape == (6, 3, 224, 224) and batch.dtype == torch.float32
    assert float(batch.min()) >= -1.0 and float(batch.max()) <= 1.0  # mean = std = 0.5
    assert torch.allclose(batch[5, :, 0, 0], torch.tensor([10, 20, 30]) / 127.5 - 1, atol=1e-2)
    # transparent pixels composite onto white
    clear = _save(tmp_path, "g.png", Image.new("RGBA", (8, 8), (0, 0, 0, 0)))
    assert np.asarray(load_image(clear)).min() == 255
    assert Preprocess(size=16).key() != Preprocess(size=16, mean=(0.4, 0.5, 0.5)).key()


def test_images_non_image_and_corrupt_files_name_the_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello, I am not a picture\n")
    with pytest.raises(DataError, match=r"notes\.png is not an image") as e:
        load_image(text)
    assert "\n" not in str(e.value)

    good = _save(tmp_path, "ok.png", Image.new("RGB", (64, 64), (200, 0, 0)))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match=r"cut\.png is a corrupt or truncated image"):
        load_image(truncated)
    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(DataError, match=r"bad\.png"):
        Preprocess(size=8).batch([good, tmp_path / "bad.png"])
