"""Images in, normalised tensors out: any size, PNG or JPEG (anything Pillow decodes).

Vision encoders see a fixed square input, so every image goes through the same steps:
decode -> RGB -> resize the shorter side -> centre crop -> [0, 1] -> (x - mean) / std.
The steps and their numbers live in one `Preprocess` value, whose `key()` also names a
feature cache, so features computed under one preprocessing are never served for another.

A file that is not an image, or a truncated/corrupt one, is a one-line `DataError` naming
the file (Pillow's own exceptions are several types and say nothing about the fix).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from septet.errors import DataError

# what `load_image` / `Preprocess.__call__` accept: a path, a decoded PIL image, or an
# (H, W) / (H, W, 3|4) uint8 array such as `skimage.data.chelsea()`
ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file into an RGB PIL image; a non-image or corrupt file -> DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist; pass the path of a PNG or JPEG file")
    try:
        with warnings.catch_warnings():
            # a decompression bomb (a small file inflating past Pillow's MAX_IMAGE_PIXELS,
            # ~89 Mpx) is refused before decoding instead of merely warned about
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: a truncated file fails here, inside the try
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS:,} pixels); "
                        "downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        kind = "is not an image" if isinstance(e, UnidentifiedImageError) else "is a corrupt or truncated image"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path} {kind} ({reason}); pass a PNG or JPEG file") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 3-channel RGB. Transparency is composited onto white, since a
    transparent background usually means 'paper', and black would invent a dark scene."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "I;16" or img.mode == "I":  # 16-bit grey: scale into 8 bits before RGB
        arr = np.asarray(img, dtype=np.float64)
        top = max(float(arr.max()), 1.0)
        return Image.fromarray((arr * (255.0 / top)).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1, F ...


def as_pil(image: ImageLike) -> Image.Image:
    """A path, PIL image or uint8 array -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and 0.0 <= arr.min() and arr.max() <= 1.0:
                arr = (arr * 255.0).round().astype(np.uint8)  # skimage's float convention
            else:
                raise DataError(f"image array has dtype {arr.dtype}; pass uint8 (0..255) or float (0..1)")
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
            return to_rgb(Image.fromarray(arr))
        raise DataError(f"image array has shape {arr.shape}; pass (H, W), (H, W, 3) or (H, W, 4)")
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    raise DataError(f"cannot read an image from a {type(image).__name__}; pass a path, PIL image or array")


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, centre-crop `size` x `size`, normalise.

    `resize` = 0 means `size` (no crop margin). ImageNet evaluation conventionally keeps
    the central 87.5% (resize 256, crop 224); for easy-VQA's 64 x 64 renders the shape may
    touch the border, so its callers pass resize == size to keep the whole image.
    """

    size: int = 224
    resize: int = 0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"  # bicubic | bilinear | nearest

    def __post_init__(self) -> None:
        if self.size < 1 or self.resize < 0 or (self.resize and self.resize < self.size):
            raise DataError(f"Preprocess size={self.size}, resize={self.resize}: need size >= 1 "
                            "and resize == 0 or resize >= size")
        if self.interpolation not in _RESAMPLE:
            raise DataError(f"Preprocess interpolation {self.interpolation!r} is unknown; "
                            f"use one of {', '.join(_RESAMPLE)}")
        if any(s <= 0 for s in self.std):
            raise DataError(f"Preprocess std {self.std} must be positive")

    def key(self) -> str:
        """A stable text form, used to name feature caches."""
        mean = ",".join(f"{m:g}" for m in self.mean)
        std = ",".join(f"{s:g}" for s in self.std)
        return f"size={self.size};resize={self.resize or self.size};mean={mean};std={std};interp={self.interpolation}"

    def crop(self, image: ImageLike) -> Image.Image:
        """Resize (shorter side) and centre-crop to size x size, as an RGB PIL image."""
        img = as_pil(image)
        target = self.resize or self.size
        w, h = img.size
        scale = target / min(w, h)
        nw, nh = max(target, round(w * scale)), max(target, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), _RESAMPLE[self.interpolation])
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))

    def __call__(self, image: ImageLike) -> torch.Tensor:
        """One image -> (3, size, size) float32, normalised."""
        x = pil_to_tensor(self.crop(image))  # (3, S, S) in [0, 1]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def batch(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Many images -> (B, 3, size, size)."""
        if not images:
            raise DataError("no images to preprocess")
        return torch.stack([self(im) for im in images])


_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [0, 1]."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


__all__ = ["ImageLike", "Preprocess", "as_pil", "load_image", "pil_to_tensor", "to_rgb"]
