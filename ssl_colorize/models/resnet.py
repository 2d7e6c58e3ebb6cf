"""ResNet-50 on L (Goyal et al. 2019).

``resnet50_lab``: timm's ResNet-50 built with ``pretrained=False`` (nothing is ever downloaded), one
input channel, no classifier. Its modules are re-registered under stage names (conv1, maxpool, res2..res5)
so the state_dict reads ``res2.0.conv1.weight`` etc. With ``stride1_last_stage=True`` (default) res5
runs at stride 16 as Goyal et al. and VISSL run it (``LAYER4_STRIDE: 1`` in VISSL's configs;
docs/protocols.md section 3): the first res5 block's 3x3 conv and its shortcut take stride 1 and
nothing is dilated, so res5 is 14x14 at 224. (timm's ``output_stride=16`` would instead dilate res5's
later convs, which is not their network.) The weights' shapes are those of the stride-2 ResNet-50.
A 1x1 conv 2048 -> 313 is the pretext head.

Taps: conv1 is the stem after conv + BN + ReLU and *before* the max-pool (64 channels, stride 2:
112x112 at 224), consistent with the AlexNet taps, which are read before their pools; res2..res5 are
the four stages' outputs.
"""

from __future__ import annotations

from collections import OrderedDict

import timm
from torch import nn

from ssl_colorize.models.base import Encoder, Tap
from ssl_colorize.models.cards import EncoderCard, PretrainRecipe, ProbeDefaults, TransferDefaults
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
        )
        if stride1_last_stage:
            _undo_stage_stride(trunk.layer4)
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


def _undo_stage_stride(stage: nn.Sequential) -> None:
    """Stride 1 in the stage's first block (its 3x3 conv and its 1x1 shortcut), with no dilation."""
    first = stage[0]
    first.conv2.stride = (1, 1)
    if first.downsample is not None:
        for module in first.downsample.modules():
            if isinstance(module, nn.Conv2d):
                module.stride = (1, 1)
            elif isinstance(module, nn.AvgPool2d):  # timm's avg_down variant: no pooling at stride 1
                raise ValueError("resnet50_lab: an average-pool shortcut cannot run at stride 1")


# Recipes: docs/protocols.md; there is no released colorization recipe for ResNet-50, so the
# AlexNet solver at 224 px, batch 64, wd 1e-4 (usual for ResNets), with the AlexNet recipe's released
# details (256x256 squashed images, biases lr x2 / no decay, BatchNorm momentum 0.001, per-pixel loss),
# but torch's He init: Kraehenbuehl et al.'s code (magic_init) does not handle residual (DAG) networks
# (its README; 'Split' is among its unsupported layers). Probe: Goyal et al. (wd 1e-4).
RESNET50_LAB_CARD = EncoderCard(
    name="resnet50_lab",
    family="resnet",
    pretrain=PretrainRecipe(224, 64, 450_000, 3e-5, (240_000, 300_000, 400_000), (1 / 3, 1 / 10, 1 / 30),
                            (0.9, 0.999), 1e-4, resize=256, resize_mode="squash", loss_reduction="mean",
                            init="default", bias_lr_mult=2.0, bias_decay_mult=0.0, bn_momentum=0.001,
                            source="no released recipe: the AlexNet solver at 224 px, wd 1e-4"),
    pretrain_builtin=PretrainRecipe(64, 16, 150, 3e-4, (100, 130), (0.3, 0.1), (0.9, 0.999), 1e-4, resize=80,
                                    source="built-in default"),
    # Probe: Goyal et al. / VISSL's average pooling at 224 px, (kernel, stride, padding) per tap
    # (docs/protocols.md section 4); res5 runs at stride 16 as in VISSL (14x14 at 224), so k12 s2 gives
    # its 2x2.
    probe=ProbeDefaults(crop=224, weight_decay=1e-4, protocol="goyal",
                        grids={"conv1": 12, "res2": 6, "res3": 4, "res4": 3, "res5": 2},
                        avg_pools={"conv1": (10, 10, 4), "res2": (16, 8, 0), "res3": (13, 5, 0), "res4": (8, 3, 0),
                                   "res5": (12, 2, 0)}),
    transfer=TransferDefaults(
        crop=224, feature_tap="res5", detection_tap="res4", detection_head_stages=("res5",), detection_roi=14,
        segmentation_tap="res5", scopes={"fc8": (), "fc6-8": ("res5",), "all": None}),
    description="ResNet-50 on L (Goyal et al.)",
)


@register_model(card=RESNET50_LAB_CARD)
def resnet50_lab(stride1_last_stage: bool = True, out_channels: int = NUM_BINS) -> ResNet50Lab:
    """ResNet-50 colorization encoder on L (Goyal et al. 2019); res5 at stride 1 by default."""
    return ResNet50Lab(stride1_last_stage=stride1_last_stage, out_channels=out_channels)
