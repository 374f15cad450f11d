"""Vision encoders for the vision-language models: EfficientNet-Lite0 (a real, frozen,
ImageNet-trained CNN) and a ViT trainable from scratch.

Both expose `visual_tokens(images (B, 3, H, W)) -> (B, N, D)`, the token sequence that
Flamingo's Perceiver Resampler and BLIP-2's Q-Former cross-attend to.

EfficientNet (Tan & Le 2019) stacks inverted-residual "MBConv" blocks (Sandler et al.
2018): 1x1 expand -> depthwise kxk -> 1x1 linear projection, with a residual when the
shape is unchanged. The Lite variants (TensorFlow's efficientnet-lite release, 2020)
drop squeeze-and-excitation and swap Swish for ReLU6, because both quantise and run
poorly on mobile accelerators, and keep the stem (32 ch) and head (1280 ch) fixed when
scaling. The released weights were trained in TensorFlow, so convolutions pad "SAME"
(asymmetric for stride 2: the extra pixel goes right/bottom) and BatchNorm eps is 1e-3.

ViT (Dosovitskiy et al. 2021): non-overlapping patches -> linear embedding (a strided
conv), optional [CLS] token, learned absolute positions, pre-LN Transformer encoder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from septet.data.images import Preprocess
from septet.errors import CheckpointError, ConfigError, InputError
from septet.nn.attention import Attention
from septet.nn.mlp import GeluMLP
from septet.nn.norms import LayerNorm
from septet.nn.positions import LearnedPositions

from .base import init_normal

# ====================================================================== EfficientNet-Lite


@dataclass(frozen=True)
class Stage:
    """`repeats` MBConv blocks; the first has `stride`, the rest stride 1."""

    repeats: int
    kernel: int
    stride: int
    expand: int  # expansion ratio of the 1x1 "expand" conv (1: no expand conv)
    out: int  # output channels


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    # EfficientNet-B0's stage table at width = depth = 1.0 (Tan & Le 2019, Table 1);
    # Lite0 uses it unchanged, only without SE and with ReLU6.
    stages: tuple[Stage, ...] = (
        Stage(1, 3, 1, 1, 16),
        Stage(2, 3, 2, 6, 24),
        Stage(2, 5, 2, 6, 40),
        Stage(3, 3, 2, 6, 80),
        Stage(3, 5, 1, 6, 112),
        Stage(4, 5, 2, 6, 192),
        Stage(1, 3, 1, 6, 320),
    )
    stem: int = 32
    head: int = 1280
    n_classes: int = 1000
    bn_eps: float = 1e-3  # TensorFlow's BatchNorm default, which the weights were trained with
    dropout: float = 0.2  # before the classifier (unused in eval)
    image_size: int = 224


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow "SAME" padding for any input size: output = ceil(input / stride), the
    odd pixel of padding on the right/bottom. PyTorch's symmetric padding=k//2 shifts every
    stride-2 feature map by half a pixel against what the TF-trained weights expect."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class ConvBN(nn.Module):
    """SAME-padded conv (no bias: BN follows) -> BatchNorm -> optional ReLU6."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, *, groups: int = 1,
                 act: bool = True, eps: float = 1e-3):
        super().__init__()
        self.kernel, self.stride, self.act = kernel, stride, act
        # stride 1, odd kernel: SAME is symmetric, so the conv pads itself (no extra copy)
        pad = kernel // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=pad, groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c_out, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = same_pad(x, self.kernel, self.stride)
        x = self.bn(self.conv(x))
        return F.relu6(x, inplace=True) if self.act else x

    @torch.no_grad()
    def fold_batchnorm(self) -> None:
        """Inference only: fold BN's running statistics into the conv, y = w'·x + b' with
        w' = w·γ/σ, b' = β − μ·γ/σ. The network computes the same function (up to rounding)
        in one pass instead of three over each activation map: on a CPU the BN and ReLU
        passes cost more than the depthwise convs themselves."""
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
        conv = self.conv
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, groups=conv.groups, bias=True)
        folded.weight.copy_(conv.weight * scale[:, None, None, None])
        folded.bias.copy_(bn.bias - bn.running_mean * scale)
        self.conv, self.bn = folded, nn.Identity()


class MBConv(nn.Module):
    """Inverted residual: expand (1x1) -> depthwise (kxk, stride) -> project (1x1, linear).
    The projection has no activation: a ReLU on the narrow bottleneck destroys information
    (MobileNetV2, §3.2)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, eps: float):
        super().__init__()
        mid = c_in * expand
        self.expand = ConvBN(c_in, mid, 1, eps=eps) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid, eps=eps)
        self.project = ConvBN(mid, c_out, 1, act=False, eps=eps)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    def __init__(self, config: EfficientNetLiteConfig | None = None):
        super().__init__()
        self.config = c = config or EfficientNetLiteConfig()
        self.stem = ConvBN(3, c.stem, 3, 2, eps=c.bn_eps)
        blocks, c_in = [], c.stem
        for st in c.stages:
            for i in range(st.repeats):
                blocks.append(MBConv(c_in, st.out, st.kernel, st.stride if i == 0 else 1, st.expand, c.bn_eps))
                c_in = st.out
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBN(c_in, c.head, 1, eps=c.bn_eps)
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(c.head, c.n_classes)

    @property
    def d_visual(self) -> int:
        return self.config.head

    def fold_batchnorm(self) -> "EfficientNetLite":
        """Fold every BatchNorm into its conv (eval-only; see ConvBN.fold_batchnorm)."""
        if self.training:
            raise InputError("fold_batchnorm needs eval mode: folded BN cannot train; call .eval() first")
        for m in self.modules():
            if isinstance(m, ConvBN):
                m.fold_batchnorm()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, 1280, H/32, W/32); 224 x 224 gives 7 x 7."""
        x = self.stem(images)  # (B, 32, H/2, W/2)
        for block in self.blocks:
            x = block(x)  # ... (B, 320, H/32, W/32)
        return self.head(x)  # (B, 1280, H/32, W/32)

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The feature map as a token sequence, row-major: (B, 49, 1280) at 224 x 224."""
        return self.features(images).flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000)."""
        pooled = self.features(images).mean(dim=(2, 3))  # (B, 1280)
        return self.classifier(self.dropout(pooled))


# Lite0 eval preprocessing: mean = std = 0.5 (the TF-Lite release's 127/128 scaling) on a
# 224 x 224 centre crop of the image resized to 256 on its shorter side.
EFFICIENTNET_LITE0_PREPROCESS = Preprocess(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# The released file names its modules like the `efficientnet_pytorch` package; ours are
# shorter. Each rule maps one module prefix; tensor suffixes (.weight, .running_mean ...) carry over.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
    (r"^_fc\.", "classifier."),
)


def _rename(key: str) -> str | None:
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def map_efficientnet_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename a released state dict onto `model`'s names, checking every key and shape.

    Any key the model does not have, any model key the file lacks, and any shape
    difference is a CheckpointError naming the key and both shapes."""
    want = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not torch.is_tensor(tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        name = _rename(key)
        if name is None or name not in want:
            raise CheckpointError(f"{source}: key {key!r} has no place in EfficientNet-Lite0"
                                  f"{f' (mapped to {name!r})' if name else ''}; the file is not "
                                  "EfficientNet-Lite0 weights")
        if tuple(tensor.shape) != tuple(want[name].shape):
            raise CheckpointError(f"{source}: key {key!r} (-> {name}) has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(want[name].shape)}; the file is not EfficientNet-Lite0 weights")
        mapped[name] = tensor
    missing = [k for k in want if k not in mapped]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors are missing, first {missing[0]!r} "
                              f"(shape {tuple(want[missing[0]].shape)}); the file is incomplete")
    return mapped


def load_efficientnet_lite0(path: str | Path | None = None, *, frozen: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite0 with its ImageNet weights (default: the `efficientnet-lite0` asset).

    frozen=True (the VLM use): eval mode, so BatchNorm uses its running statistics and
    dropout is off, BatchNorm folded into the convs (faster on a CPU), and no
    parameter requires a gradient. frozen=False keeps the released module layout."""
    if path is None:
        from septet.assets import asset_file

        path = asset_file("efficientnet-lite0", "*.pth", quiet=True)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"EfficientNet-Lite0 weights {path} do not exist; run `septet fetch efficientnet-lite0`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors come in many types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch weights file ({reason}); re-fetch it") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    model = EfficientNetLite()
    model.load_state_dict(map_efficientnet_state(model, state, str(path)), strict=True)
    if frozen:
        model.eval().fold_batchnorm().requires_grad_(False)
    return model


# ImageNet-1k indices the tests and demos name (not the full list: we write only names we
# can vouch for, and report other classes by index).
IMAGENET_NAMES: dict[int, str] = {
    281: "tabby cat", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat",
    504: "coffee mug", 967: "espresso", 968: "cup",
}


# ====================================================================== ViT


@dataclass
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    channels: int = 3
    n_layer: int = 6
    d_model: int = 192
    n_head: int = 3
    d_ff: int = 0  # 0: 4 * d_model
    cls_token: bool = True
    norm_eps: float = 1e-6  # the ViT reference implementation's LayerNorm eps

    def __post_init__(self) -> None:
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model
        if self.image_size % self.patch_size:
            raise ConfigError(f"ViT image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.d_model % self.n_head:
            raise ConfigError(f"ViT d_model={self.d_model} is not a multiple of n_head={self.n_head}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_tokens(self) -> int:
        return self.n_patches + int(self.cls_token)


class BidirectionalAttention(Attention):
    """Septet's attention projections, without the causal mask: every token sees every
    token (ViT; BERT-style encoders). `key_mask` (B, S) bool hides padding keys."""

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.n_head, self.d_head
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, H, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class EncoderBlock(nn.Module):
    """Pre-LN: x + Attn(LN(x)), then x + MLP(LN(x)) (ViT §3.1, eqs. 2-3)."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, eps: float):
        super().__init__()
        self.ln_1 = LayerNorm(d_model, eps)
        self.attn = BidirectionalAttention(d_model, n_head, n_head, d_model // n_head, bias=True)
        self.ln_2 = LayerNorm(d_model, eps)
        self.mlp = GeluMLP(d_model, d_ff, bias=True)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), key_mask)
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """forward(images (B, C, S, S)) -> tokens (B, N, D): [CLS] first when enabled, then
    the patch grid row-major, after the final LayerNorm."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        # a conv with kernel = stride = patch is exactly "flatten each patch, then Linear"
        self.patch_embed = nn.Conv2d(c.channels, c.d_model, c.patch_size, stride=c.patch_size)
        self.cls_emb = nn.Parameter(torch.zeros(1, 1, c.d_model)) if c.cls_token else None
        self.pos_emb = LearnedPositions(c.n_tokens, c.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(c.d_model, c.n_head, c.d_ff, c.norm_eps) for _ in range(c.n_layer))
        self.norm_f = LayerNorm(c.d_model, c.norm_eps)
        init_normal(self, std=0.02, residual_std=0.02 / math.sqrt(2 * c.n_layer))
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.02)

    @property
    def d_visual(self) -> int:
        return self.config.d_model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.dim() != 4 or images.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise InputError(f"ViT expects images of shape (B, {c.channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(images.shape)}; preprocess with size={c.image_size}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_emb is not None:
            x = torch.cat((self.cls_emb.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, D)
        x = x + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        return self.norm_f(x)

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)  # (B, N_tokens, D)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """One vector per image: the [CLS] output, or the mean of the patch tokens."""
        return tokens[:, 0] if self.cls_emb is not None else tokens.mean(dim=1)  # (B, D)


__all__ = [
    "EFFICIENTNET_LITE0_PREPROCESS", "IMAGENET_NAMES", "BidirectionalAttention", "EfficientNetLite",
    "EfficientNetLiteConfig", "EncoderBlock", "MBConv", "Stage", "ViT", "ViTConfig",
    "load_efficientnet_lite0", "map_efficientnet_state", "same_pad",
]
