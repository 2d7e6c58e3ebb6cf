"""``alexnet_lab``: the AlexNet variant the colorization benchmarks evaluate (docs/protocols.md section 3).

L input, no LRN, a BatchNorm without affine between every conv / fc and its ReLU (as the released
``train_alexnet/train_val.prototxt``), fc6 / fc7 as convolutions and a 313-way 1x1 head on fc7.

Two geometries share the same weights (only paddings, strides and dilations differ):

=========  ===============================  ==================================
layer      ``geometry="train"`` (180 crops)  ``geometry="transfer"`` (CaffeNet)
=========  ===============================  ==================================
conv1      11x11 s4, pad 5                   11x11 s4, pad 0
pool1/2    3x3 s2, pad 1, ceil               3x3 s2, pad 0, ceil
pool5      3x3 s1, pad 1                     3x3 s2, pad 0 (-> 6x6 at 227)
fc6        6x6, dilation 2, pad 5            6x6, undilated, pad 0
=========  ===============================  ==================================

conv2 (5x5, pad 2) and conv3-5 (3x3, pad 1) are the same in both. At 180 the train geometry gives
12x12 logits; the loss grid is every 8th pixel (23x23), so training uses :meth:`Encoder.logits_at`,
which bilinearly resizes them (the released code's Resize layer). At 227 the transfer geometry gives
conv1..conv5 maps of 96x55x55, 256x27x27, 384x13x13, 384x13x13, 256x13x13 and 1x1 fc6 / fc7.

Taps are post-ReLU and taken before the pools: conv1 is 55x55 at 227, conv2 27x27.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ssl_colorize.models.base import Encoder, Tap, init_conv_weights_
from ssl_colorize.targets import NUM_BINS
from ssl_colorize.models.cards import EncoderCard, PretrainRecipe, ProbeDefaults, TransferDefaults
from ssl_colorize.models.registry import register_model

GEOMETRIES = ("train", "transfer")

# (padding of conv1, padding of pool1/pool2, (stride, padding) of pool5, (dilation, padding) of fc6)
_GEOMETRY = {
    "train": {"conv1_pad": 5, "pool_pad": 1, "pool5": (1, 1), "fc6": (2, 5)},
    "transfer": {"conv1_pad": 0, "pool_pad": 0, "pool5": (2, 0), "fc6": (1, 0)},
}


def _conv_bn_relu(
    c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups),
            bn=nn.BatchNorm2d(c_out, affine=False),
            relu=nn.ReLU(inplace=True),
        )
    )


class AlexNetLab(Encoder):
    """AlexNet on L with BatchNorm (no affine); see the module docstring for the two geometries.

    ``in_chans=1`` (default) takes L in [0, 100]; ``in_chans=3`` takes RGB in [0, 1] instead (the same
    architecture for a supervised or RGB-input baseline).
    """

    def __init__(self, geometry: str = "train", in_chans: int = 1, out_channels: int = NUM_BINS) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"alexnet_lab: in_chans must be 1 (L) or 3 (RGB), got {in_chans!r}")
        super().__init__(input_space="L" if in_chans == 1 else "rgb")
        self.conv1 = _conv_bn_relu(in_chans, 96, 11, stride=4)
        self.pool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = _conv_bn_relu(96, 256, 5, padding=2, groups=2)
        self.pool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv3 = _conv_bn_relu(256, 384, 3, padding=1)
        self.conv4 = _conv_bn_relu(384, 384, 3, padding=1, groups=2)
        self.conv5 = _conv_bn_relu(384, 256, 3, padding=1, groups=2)
        self.pool5 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.fc6 = _conv_bn_relu(256, 4096, 6)
        self.fc7 = _conv_bn_relu(4096, 4096, 1)
        self.head = nn.Conv2d(4096, self.head_channels(out_channels), 1)
        self.stage_names = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7")
        self.probe_taps = ("conv1", "conv2", "conv3", "conv4", "conv5")
        # The loss grid is every 8th pixel in both geometries (docs/protocols.md section 2); the logits'
        # native stride is 16 (train) or 32 (transfer), hence logits_at's resize.
        self.output_stride = 8
        init_conv_weights_(self, head=self.head)
        self.geometry = ""
        self.set_geometry(geometry)

    def set_geometry(self, geometry: str) -> "AlexNetLab":
        """Switch between the "train" and "transfer" geometries in place; the weights are untouched."""
        if geometry not in GEOMETRIES:
            raise ValueError(f"alexnet_lab: geometry must be one of {GEOMETRIES}, got {geometry!r}")
        g = _GEOMETRY[geometry]
        self.conv1.conv.padding = (g["conv1_pad"], g["conv1_pad"])
        for pool in (self.pool1, self.pool2):
            pool.padding = g["pool_pad"]
        self.pool5.stride, self.pool5.padding = g["pool5"]
        dilation, padding = g["fc6"]
        self.fc6.conv.dilation = (dilation, dilation)
        self.fc6.conv.padding = (padding, padding)
        fc_stride = 16 * self.pool5.stride
        self.taps = {
            "conv1": Tap(96, 4),
            "conv2": Tap(256, 8),
            "conv3": Tap(384, 16),
            "conv4": Tap(384, 16),
            "conv5": Tap(256, 16),
            "fc6": Tap(4096, fc_stride),
            "fc7": Tap(4096, fc_stride),
        }
        self.geometry = geometry
        spec = getattr(self, "model_spec", None)
        if spec is not None:
            spec["kwargs"]["geometry"] = geometry
        return self

    def extra_repr(self) -> str:
        return f"geometry={self.geometry!r}, input_space={self.input_space!r}"


# The linear probe's grids per tap (protocol "zhang": the Resize layers of the released
# feature_learning_tests/linear/train_val.prototxt; "max" uses the same grids) and Goyal et al.'s
# fixed average-pooling kernels at 227 px (protocol "goyal": (kernel, stride, padding)); docs/protocols.md
# section 4.
ALEXNET_PROBE_GRIDS = {"conv1": 10, "conv2": 6, "conv3": 5, "conv4": 5, "conv5": 6}
ALEXNET_GOYAL_POOLS = {"conv1": (19, 4, 0), "conv2": (12, 3, 0), "conv3": (9, 1, 0), "conv4": (9, 1, 0),
                       "conv5": (8, 1, 0)}


# The released recipe (richzhang/colorization; docs/protocols.md section 3, docs/pretraining.md):
# - train_alexnet/solver0..3.prototxt: type Adam, momentum 0.9 / momentum2 0.999, weight_decay 0.001,
#   base_lr 3e-5 / 1e-5 / 3e-6 / 1e-6 up to max_iter 240k / 300k / 400k / 450k;
# - train_alexnet/train_val.prototxt: crop_size 180, batch_size 80; conv/fc ``param { lr_mult: 1
#   decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }`` (biases lr x2, no decay); BatchNorm with
#   ``batch_norm_param {}`` (moving_average_fraction 0.999: torch momentum 0.001); the loss
#   ``SoftmaxCrossEntropyLoss`` with ``loss_param { normalize: True }`` (per pixel: "mean");
# - train/readme (d): the LMDB images are 256x256 (squashed; "squash");
# - train_alexnet/train_model.sh starts from mi.caffemodel, made by run_init.sh: magic_init ``-t kmeans``.
# Transfer as CaffeNet (227 px, the "transfer" geometry: same weights).
ALEXNET_LAB_CARD = EncoderCard(
    name="alexnet_lab",
    family="alexnet",
    pretrain=PretrainRecipe(180, 80, 450_000, 3e-5, (240_000, 300_000, 400_000), (1 / 3, 1 / 10, 1 / 30),
                            (0.9, 0.999), 1e-3, resize=256, resize_mode="squash", loss_reduction="mean",
                            init="kmeans", bias_lr_mult=2.0, bias_decay_mult=0.0, bn_momentum=0.001,
                            source="released AlexNet-Lab solver (train_alexnet/solver0..3, train_val.prototxt)"),
    # The built-in default: 128 px images seen at 80 px (64 px crops), 120 steps of 32 with Adam at a
    # higher rate (3e-5 is tuned for 450k iterations), drops at 70% and 90% of the run. The architecture
    # is unchanged. Sized for <= ~5 min on a 2-core CPU (issue 16): 120 x 32 took 4.4 min there (15 img/s)
    # and its features beat the random init at every probed layer; 90 x 16 and 160 x 16 were faster but
    # learnt nothing the probe could see (docs/builtin-results.md).
    pretrain_builtin=PretrainRecipe(64, 32, 120, 1e-3, (84, 108), (0.3, 0.1), (0.9, 0.999), 1e-3, resize=80,
                                    source="built-in default"),
    # Probe: the released probe (protocol "zhang") is the paper's own.
    probe=ProbeDefaults(crop=227, weight_decay=5e-4, protocol="zhang", grids=ALEXNET_PROBE_GRIDS,
                        avg_pools=ALEXNET_GOYAL_POOLS),
    transfer=TransferDefaults(
        crop=227, feature_tap="fc7", detection_tap="conv5", detection_head_stages=("fc6", "fc7"), detection_roi=6,
        segmentation_tap="fc7", scopes={"fc8": (), "fc6-8": ("pool5", "fc6", "fc7"), "all": None},
        model_kwargs={"geometry": "transfer"},
        # feature_learning_tests/classification/dummy.prototxt (richzhang/colorization): drop6 / drop7 after
        # relu6 / relu7, dropout_ratio 0.5 (the classification_trainval.prototxt the test script names is not released);
        # detection as the paper: Fast R-CNN over selective-search proposals (docs/protocols.md section 5).
        dropout_after=("fc6", "fc7"), detector="fast-rcnn"),
    description="the paper's AlexNet on L",
)


@register_model(card=ALEXNET_LAB_CARD)
def alexnet_lab(geometry: str = "train", in_chans: int = 1, out_channels: int = NUM_BINS) -> AlexNetLab:
    """AlexNet colorization encoder (docs/protocols.md section 3); ``geometry`` in {"train", "transfer"}."""
    return AlexNetLab(geometry=geometry, in_chans=in_chans, out_channels=out_channels)
