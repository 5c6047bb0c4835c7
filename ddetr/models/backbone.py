"""ResNet backbone with frozen batch norm (or group norm), returning C3-C5 (or C5) feature maps and their masks.

Parameter names equal torchvision's ResNet (`conv1`, `bn1`, `layer1.0.conv1`, `...downsample.0`), so its
ImageNet weights load directly, and under the model they read `backbone.0.body.*` as in the official release.
Nothing is downloaded unless `build_backbone` is given "imagenet" or a URL and asked to load it. Weights are read
with `torch.load(weights_only=True)` (tensors and containers only: a pickle that would run code is refused), from
`https://` only, and checked against the sha256 prefix that torchvision's file names carry.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import posixpath
import re
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.config import ConfigError
from ddetr.models.position_encoding import PositionEmbeddingSine

# torchvision's ImageNet-1k (V1) weights, the ones the official release trained from.
IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}
# torchvision names a weights file `<model>-<first 8 or more hex digits of its sha256>.pth`.
HASHED_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all buffers: detection batches are too small
    to estimate statistics, so the ImageNet ones are kept."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # torchvision's BatchNorm2d carries a step counter that a frozen layer has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


# A normalization layer of `channels` features.
Norm = Callable[[int], nn.Module]
GROUP_NORM_GROUPS = 32


def norm_layer(kind: str) -> Norm:
    """The backbone's normalization: "frozen_bn" (the official one, fixed ImageNet statistics; the identity at
    random init) or "group_norm" (GroupNorm(32), trained, for a backbone trained from scratch: it normalizes
    at any batch size, where batch statistics of 2 images per worker would not)."""
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind == "group_norm":
        return lambda channels: nn.GroupNorm(GROUP_NORM_GROUPS, channels)
    raise ValueError(f"unknown backbone norm {kind!r}: frozen_bn or group_norm")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        norm: Norm = FrozenBatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, the "ResNet v1.5" of torchvision) -> 1x1 (ResNet-50/101)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        norm: Norm = FrozenBatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


RESNET_SPECS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}


class ResNet(nn.Module):
    """The convolutional part of torchvision's ResNet (no pooling head, no `fc`).

    forward: (B, 3, H, W) -> dict {"layer2": (B, C3, H/8, W/8), "layer3": (B, C4, H/16, W/16),
    "layer4": (B, C5, H/32, W/32)} (H/16 for layer4 with `dilation`).
    """

    def __init__(self, name: str, dilation: bool = False, norm: Norm = FrozenBatchNorm2d) -> None:
        super().__init__()
        block, layers = RESNET_SPECS[name]
        self.inplanes, self.dilation, self.norm = 64, 1, norm
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=dilation)
        self.channels = [128 * block.expansion, 256 * block.expansion, 512 * block.expansion]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            # DC5: trade the stride for dilation; the first block keeps the previous dilation, as torchvision.
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                self.norm(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation, self.norm)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation, norm=self.norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"layer2": c3, "layer3": c4, "layer4": c5}


def has_pretrained_weights(source: str | None) -> bool:
    """Whether `model.pretrained_backbone` names weights ("imagenet", a path, a URL) rather than random init."""
    return source is not None and source.strip().lower() not in ("", "none", "null")


def load_imagenet_weights(body: ResNet, source: str, name: str) -> None:
    """Load torchvision ImageNet weights into `body` from a local path, a URL, or "imagenet" (the torchvision URL).

    The classifier (`fc.*`) is dropped; every other key must match, else a RuntimeError names them.
    """
    if source.lower() == "imagenet":
        source = IMAGENET_URLS[name]
    if "://" in source:
        path = fetch_weights(source, name)
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(
                f"backbone weights file {source!r} not found; set model.pretrained_backbone to an existing "
                f"torchvision {name} .pth file, an https:// URL, 'imagenet', or 'none' for random init"
            )
        path = Path(source)
    state = read_weights_file(path, source)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    result = body.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"backbone weights {source} do not fit {name}: missing {result.missing_keys[:10]}, "
            f"unexpected {result.unexpected_keys[:10]} (is it a torchvision {name} state dict?)"
        )


def fetch_weights(url: str, name: str) -> Path:
    """The weights file at `url` (https:// only), downloaded once into torch's hub cache (`$TORCH_HOME/hub/
    checkpoints`, where `torch.hub.load_state_dict_from_url` keeps it too), its sha256 checked when its name carries
    a prefix of it (torchvision's do): on download, and again when found in the cache.

    Raises:
        ConfigError: not https:// (refused before any request), or a file whose hash is not the one its name gives.
        RuntimeError: the download failed (the network's error, on one line).
    """
    if not url.lower().startswith("https://"):
        raise ConfigError(
            f"model.pretrained_backbone={url}: only https:// URLs are fetched (a plain http:// download can be "
            "replaced on its way); give an https:// URL, or download the file yourself and give its path"
        )
    file_name = posixpath.basename(urllib.parse.urlparse(url).path) or f"{name}.pth"
    cached = Path(torch.hub.get_dir(), "checkpoints", file_name)
    if cached.is_file():
        check_name_hash(cached, url)
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{file_name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        try:
            torch.hub.download_url_to_file(url, str(tmp), progress=False)
        except Exception as e:  # URLError, HTTPError, socket errors...: all mean "could not fetch"
            reason = " ".join(str(e).split())  # one line, whatever the network error printed
            raise RuntimeError(
                f"could not download the {name} backbone weights from {url} ({reason}); fetch that file "
                f"elsewhere and pass model.pretrained_backbone=/path/to/{file_name}, or "
                f"model.pretrained_backbone=none to train from random weights"
            ) from e
        check_name_hash(tmp, url)
        os.replace(tmp, cached)  # only a file that passed the check is kept
    finally:
        tmp.unlink(missing_ok=True)
    return cached


def check_name_hash(path: Path, url: str) -> None:
    """Refuse `path` (downloaded from `url`) when the URL's file name carries a sha256 prefix the file does not have.

    Raises:
        ConfigError: naming the URL, the expected and the actual prefix.
    """
    match = HASHED_NAME.search(posixpath.basename(urllib.parse.urlparse(url).path))
    if match is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    expected, actual = match.group(1), digest.hexdigest()
    if not actual.startswith(expected):
        raise ConfigError(
            f"model.pretrained_backbone={url}: the file's sha256 starts {actual[: len(expected)]}, its name says "
            f"{expected}: not the file the URL names (delete {path} if it is a cached copy; check the URL)"
        )


def read_weights_file(path: Path, source: str) -> dict[str, torch.Tensor]:
    """The state dict in `path` (the file `source` named), read with `weights_only=True`.

    Raises:
        ConfigError: the file pickles more than tensors and containers (nothing of it runs), or holds no dict.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message goes on for paragraphs; the unpickler's own sentence names what was refused.
        _, found, rest = str(e).partition("WeightsUnpickler error:")
        reason = " ".join((rest.strip().split("\n\n")[0] if found else str(e)).split()).split(". ")[0][:200]
        raise ConfigError(
            f"model.pretrained_backbone={source}: refused {path}: it pickles objects other than tensors and "
            f"containers, which ddetr never unpickles ({reason}); give a torchvision state dict"
        ) from e
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise ConfigError(f"model.pretrained_backbone={source}: {path} holds a {kind}, not a state dict of tensors")
    return state


class Backbone(nn.Module):
    """ResNet body plus the downsampled padding mask of each returned level.

    Args:
        name: resnet18/34/50/101.
        return_interm_layers: return C3, C4, C5 (strides 8, 16, 32) rather than C5 alone.
        dilation: DC5 (the last level at stride 16).
        train_backbone: when False every parameter is frozen (the official `lr_backbone <= 0`).
        pretrained: the body will hold pretrained weights, so the stem and layer1 are frozen at them (the official
            schedule); from random weights nothing is frozen, since random low-level filters must learn.
        norm: "frozen_bn" or "group_norm" (see `norm_layer`).
    """

    def __init__(
        self,
        name: str,
        return_interm_layers: bool,
        dilation: bool,
        train_backbone: bool = True,
        pretrained: bool = True,
        norm: str = "frozen_bn",
    ) -> None:
        super().__init__()
        self.body = ResNet(name, dilation, norm_layer(norm))
        if norm == "group_norm":
            # Each residual branch starts at zero (its last norm's scale), so every block starts as the identity:
            # the usual start for a ResNet trained from scratch.
            for m in self.body.modules():
                last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else getattr(m, "bn2", None)
                if isinstance(m, (BasicBlock, Bottleneck)) and last is not None:
                    nn.init.zeros_(last.weight)
        for pname, p in self.body.named_parameters():
            late_stage = pname.startswith(("layer2", "layer3", "layer4"))
            if not train_backbone or (pretrained and not late_stage):
                p.requires_grad_(False)
        self.return_layers = ["layer2", "layer3", "layer4"] if return_interm_layers else ["layer4"]
        self.strides = [8, 16, 32] if return_interm_layers else [32]
        self.num_channels = self.body.channels if return_interm_layers else self.body.channels[-1:]
        if dilation:
            self.strides[-1] //= 2

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images (B, 3, H, W), mask (B, H, W) True at padding -> per level (features (B, C_l, H_l, W_l),
        mask (B, H_l, W_l))."""
        xs = self.body(images)
        out = []
        for name in self.return_layers:
            x = xs[name]
            # Nearest interpolation of the image mask, as DETR: a feature cell is padding if its top-left pixel is.
            m = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out.append((x, m))
        return out


class Joiner(nn.Sequential):
    """`backbone.0` is the CNN, `backbone.1` the position encoding (the official module layout)."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """-> ([(features, mask)] per level, [position embedding (B, d_model, H_l, W_l)] per level)."""
        features = self[0](images, mask)
        pos = [self[1](m).to(x.dtype) for x, m in features]
        return features, pos


def build_backbone(
    name: str,
    d_model: int,
    multi_scale: bool,
    dilation: bool = False,
    pretrained: str | None = None,
    train_backbone: bool = True,
    load_weights: bool = True,
    norm: str = "frozen_bn",
) -> Joiner:
    """ResNet + sine position encoding (d_model/2 features per axis).

    Args:
        pretrained: "imagenet", a path or a URL of torchvision weights; None or "none" for random init.
        train_backbone: False freezes the whole ResNet.
        load_weights: False skips reading `pretrained` (a full checkpoint is loaded next) but freezes the same
            parameters, so that a resumed optimizer sees the trainable parameters it was saved with.
    """
    pretrained_body = has_pretrained_weights(pretrained)
    backbone = Backbone(
        name,
        return_interm_layers=multi_scale,
        dilation=dilation,
        train_backbone=train_backbone,
        pretrained=pretrained_body,
        norm=norm,
    )
    if pretrained_body and load_weights:
        load_imagenet_weights(backbone.body, pretrained.strip(), name)
    return Joiner(backbone, PositionEmbeddingSine(d_model // 2, normalize=True))
