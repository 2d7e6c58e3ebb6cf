"""torchvision's AlexNet on RGB: the supervised (or random) baseline, as a feature extractor.

``alexnet_rgb_torchvision``: torchvision's AlexNet (``weights=None``); ``weights_path`` loads a local
state_dict file of torchvision's AlexNet (never downloaded). Taps conv1..conv5 (post-ReLU, pre-pool),
fc6 and fc7 (post-ReLU, returned as (N, 4096, 1, 1)). It has no colour head: forward() raises;
:meth:`TorchvisionAlexNet.imagenet_logits` gives its 1000-way ImageNet logits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torchvision
from torch import nn

from ssl_colorize.models.base import Encoder, Tap
from ssl_colorize.models.alexnet import ALEXNET_GOYAL_POOLS, ALEXNET_PROBE_GRIDS
from ssl_colorize.models.cards import EncoderCard, ProbeDefaults, TransferDefaults
from ssl_colorize.models.registry import register_model


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


# No colour head, so no pretraining recipe. Transfer as CaffeNet (227 px); its fc6 / fc7 are fully
# connected, so the FCN scores conv5 (a fully connected fc7 has no spatial map).
ALEXNET_RGB_TORCHVISION_CARD = EncoderCard(
    name="alexnet_rgb_torchvision",
    family="alexnet",
    # Probe: as the AlexNet-Lab card, so supervised and colorization AlexNets are probed alike.
    probe=ProbeDefaults(crop=227, weight_decay=5e-4, protocol="zhang", grids=ALEXNET_PROBE_GRIDS,
                        avg_pools=ALEXNET_GOYAL_POOLS),
    transfer=TransferDefaults(
        crop=227, feature_tap="fc7", detection_tap="conv5", detection_head_stages=("fc6", "fc7"), detection_roi=6,
        segmentation_tap="conv5", scopes={"fc8": (), "fc6-8": ("pool5", "fc6", "fc7"), "all": None},
        # torchvision's classifier already holds its own dropouts (before fc6 and fc7): none added.
        detector="fast-rcnn"),
    description="torchvision AlexNet on RGB (supervised baseline)",
)


@register_model(init_only=("weights_path",), card=ALEXNET_RGB_TORCHVISION_CARD)
def alexnet_rgb_torchvision(weights_path: str | None = None) -> TorchvisionAlexNet:
    """torchvision AlexNet on RGB (supervised / random baseline); weights from a local file only."""
    return TorchvisionAlexNet(weights_path=weights_path)
