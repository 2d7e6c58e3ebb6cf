"""ResNet-50 on L (Goyal et al. 2019) and a torchvision AlexNet on RGB (the supervised baseline).

``resnet50_lab``: timm's ResNet-50 built with ``pretrained=False`` (nothing is ever downloaded), one
input channel, no classifier. Its modules are re-registered under stage names (conv1, maxpool, res2..res5)
so the state_dict reads ``res2.0.conv1.weight`` etc. With ``stride1_last_stage=True`` (default, Goyal
et al.: res5 at 14x14 for 224) res5 runs at stride 16, using timm's ``output_stride=16``: res5's
downsampling is replaced by dilation 2 in its 3x3 convs (the first block keeps dilation 1), so res5's
receptive field still grows. A 1x1 conv 2048 -> 313 is the pretext head.

Taps: conv1 is the stem after conv + BN + ReLU and *before* the max-pool (64 channels, stride 2:
112x112 at 224), consistent with the AlexNet taps, which are read before their pools; res2..res5 are
the four stages' outputs.

``alexnet_rgb_torchvision``: torchvision's AlexNet (``weights=None``); ``weights_path`` loads a local
state_dict file of torchvision's AlexNet (never downloaded). Taps conv1..conv5 (post-ReLU, pre-pool),
fc6 and fc7 (post-ReLU, returned as (N, 4096, 1, 1)). It has no colour head: forward() raises;
:meth:`TorchvisionAlexNet.imagenet_logits` gives its 1000-way ImageNet logits.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from ssl_colorize.models.base import Encoder, Tap
from ssl_colorize.models.registry import register_model
from ssl_colorize.targets import NUM_BINS


class ResNet50Lab(Encoder):
    """ResNet-50 on L with a 313-way 1x1 head (output stride 16, or 32 without the stride-1 res5)."""

    def __init__(self, stride1_last_stage: bool = True, out_channels: int = NUM_BINS) -> None:
        super().__init__(input_space="L")
        trunk = timm.create_model(
            "resnet50",
            pretrained=False,
            in_chans=1,
            num_classes=0,
            global_pool="",
            output_stride=16 if stride1_last_stage else 32,
        )
        self.conv1 = nn.Sequential(OrderedDict(conv=trunk.conv1, bn=trunk.bn1, act=trunk.act1))
        self.maxpool = trunk.maxpool
        self.res2 = trunk.layer1
        self.res3 = trunk.layer2
        self.res4 = trunk.layer3
        self.res5 = trunk.layer4
        last = 16 if stride1_last_stage else 32
        self.head = nn.Conv2d(2048, self.head_channels(out_channels), 1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.stage_names = ("conv1", "maxpool", "res2", "res3", "res4", "res5")
        self.taps = {
            "conv1": Tap(64, 2),
            "res2": Tap(256, 4),
            "res3": Tap(512, 8),
            "res4": Tap(1024, 16),
            "res5": Tap(2048, last),
        }
        self.probe_taps = ("conv1", "res2", "res3", "res4", "res5")
        self.output_stride = last
        self.stride1_last_stage = stride1_last_stage


@register_model
def resnet50_lab(stride1_last_stage: bool = True, out_channels: int = NUM_BINS) -> ResNet50Lab:
    """ResNet-50 colorization encoder on L (Goyal et al. 2019); res5 at stride 1 by default."""
    return ResNet50Lab(stride1_last_stage=stride1_last_stage, out_channels=out_channels)


class _FullyConnectedMap(nn.Module):
    """Flatten, run a slice of torchvision's classifier, return (N, C, 1, 1) so every tap is a map."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))[:, :, None, None]


class TorchvisionAlexNet(Encoder):
    """torchvision's AlexNet on RGB in [0, 1] (ImageNet mean / std applied inside), as a feature extractor."""

    has_colour_head = False

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__(input_space="rgb")
        self.net = torchvision.models.alexnet(weights=None)
        if weights_path is not None:
            self.net.load_state_dict(_read_state_dict(weights_path))
        f, c = self.net.features, self.net.classifier
        # Views over self.net's modules, kept in a plain tuple so they are not registered twice
        # (the state_dict stays torchvision's, under "net.").
        self._stage_list: tuple[tuple[str, Callable[[torch.Tensor], torch.Tensor]], ...] = (
            ("conv1", nn.Sequential(f[0], f[1])),
            ("pool1", f[2]),
            ("conv2", nn.Sequential(f[3], f[4])),
            ("pool2", f[5]),
            ("conv3", nn.Sequential(f[6], f[7])),
            ("conv4", nn.Sequential(f[8], f[9])),
            ("conv5", nn.Sequential(f[10], f[11])),
            ("pool5", nn.Sequential(f[12], self.net.avgpool)),
            ("fc6", _FullyConnectedMap(nn.Sequential(c[0], c[1], c[2]))),
            ("fc7", _FullyConnectedMap(nn.Sequential(c[3], c[4], c[5]))),
        )
        self.stage_names = tuple(name for name, _ in self._stage_list)
        self.taps = {
            "conv1": Tap(64, 4),
            "conv2": Tap(192, 8),
            "conv3": Tap(384, 16),
            "conv4": Tap(256, 16),
            "conv5": Tap(256, 16),
            # fc6 / fc7 see the whole (adaptively pooled 6x6) pool5 map; stride 32 is pool5's.
            "fc6": Tap(4096, 32),
            "fc7": Tap(4096, 32),
        }
        self.probe_taps = ("conv1", "conv2", "conv3", "conv4", "conv5")
        self.output_stride = 32

    def stages(self) -> Iterator[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        yield from self._stage_list

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's 1000-way ImageNet logits (N, 1000) for RGB x in [0, 1]."""
        return self.net(self.normalize_input(x))


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torchvision AlexNet state_dict from a local file (a bare state_dict or {"state_dict": ...})."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"alexnet_rgb_torchvision: weights_path {str(path)!r} is not a file")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"alexnet_rgb_torchvision: {path} does not hold a state_dict")
    return obj


@register_model(init_only=("weights_path",))
def alexnet_rgb_torchvision(weights_path: str | None = None) -> TorchvisionAlexNet:
    """torchvision AlexNet on RGB (supervised / random baseline); weights from a local file only."""
    return TorchvisionAlexNet(weights_path=weights_path)
