"""``colornet``: the VGG-style colorization network of the paper (Table 4; docs/protocols.md section 3).

Blocks conv1..conv7 are 3x3 convolutions with ReLUs and one BatchNorm without affine after the block's
last ReLU; conv1-conv3 end with a stride-2 conv, conv5 / conv6 are dilated by 2. conv8 upsamples
(4x4 transposed conv, stride 2, to 256) then has two 3x3 convs of 256, and a 1x1 head gives 313 logits
at 1/4 of the input resolution (56x56 at 224, 44x44 at 176).

Parameters: 32,230,393, i.e. the paper's "32.2 M". Every convolution, the transposed one and the head
carry a bias, as in the released Caffe model (Caffe's default ``bias_term: true``; the deploy net's
extra ``class8_ab`` 313->2 layer is a fixed decoding matrix, not counted here: decoding lives in
ssl_colorize.targets.annealed_mean). Without biases it would be 32,222,016, also within 1%; the
biases are kept to match the released weights layer for layer.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ssl_colorize.models.base import Encoder, Tap, init_conv_weights_
from ssl_colorize.models.cards import EncoderCard, PretrainRecipe, ProbeDefaults, TransferDefaults
from ssl_colorize.models.registry import register_model
from ssl_colorize.targets import NUM_BINS

# block name -> (output channels, number of convs, stride of the last conv, dilation)
_BLOCKS = OrderedDict(
    conv1=(64, 2, 2, 1),
    conv2=(128, 2, 2, 1),
    conv3=(256, 3, 2, 1),
    conv4=(512, 3, 1, 1),
    conv5=(512, 3, 1, 2),
    conv6=(512, 3, 1, 2),
    conv7=(512, 3, 1, 1),
)


def _vgg_block(name: str, c_in: int, c_out: int, n_convs: int, last_stride: int, dilation: int) -> nn.Sequential:
    """n 3x3 convs + ReLUs, the last with ``last_stride``, then BatchNorm (no affine) after the last ReLU."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    index = name.removeprefix("conv")
    for i in range(1, n_convs + 1):
        stride = last_stride if i == n_convs else 1
        layers[f"conv{index}_{i}"] = nn.Conv2d(
            c_in if i == 1 else c_out, c_out, 3, stride=stride, padding=dilation, dilation=dilation
        )
        layers[f"relu{index}_{i}"] = nn.ReLU(inplace=True)
    layers["bn"] = nn.BatchNorm2d(c_out, affine=False)
    return nn.Sequential(layers)


class ColorNet(Encoder):
    """The paper's colorization network on L; taps conv1..conv8 are the blocks' outputs."""

    def __init__(self, out_channels: int = NUM_BINS) -> None:
        super().__init__(input_space="L")
        c_in = 1
        stride = 1
        taps: dict[str, Tap] = {}
        for name, (c_out, n_convs, last_stride, dilation) in _BLOCKS.items():
            setattr(self, name, _vgg_block(name, c_in, c_out, n_convs, last_stride, dilation))
            stride *= last_stride
            taps[name] = Tap(c_out, stride)
            c_in = c_out
        # conv8: no BatchNorm (docs/protocols.md section 3: BN after blocks 1-7 only).
        self.conv8 = nn.Sequential(
            OrderedDict(
                conv8_1=nn.ConvTranspose2d(512, 256, 4, stride=2, padding=1),
                relu8_1=nn.ReLU(inplace=True),
                conv8_2=nn.Conv2d(256, 256, 3, padding=1),
                relu8_2=nn.ReLU(inplace=True),
                conv8_3=nn.Conv2d(256, 256, 3, padding=1),
                relu8_3=nn.ReLU(inplace=True),
            )
        )
        taps["conv8"] = Tap(256, stride // 2)
        self.head = nn.Conv2d(256, self.head_channels(out_channels), 1)
        self.stage_names = tuple(taps)
        self.taps = taps
        self.probe_taps = ("conv1", "conv2", "conv3", "conv4", "conv5")
        self.output_stride = 4
        init_conv_weights_(self, head=self.head)


# The released recipe (richzhang/colorization; docs/protocols.md section 3, docs/pretraining.md):
# - train/solver.prototxt: type Adam, momentum 0.9 / momentum2 0.99, weight_decay 0.001, base_lr 3e-5,
#   lr_policy "step", gamma 0.1, stepsize 225000, max_iter 500000 (lr 3e-5 -> 3e-6 at 225k -> 3e-7 at
#   450k; train/readme (a): "completes around 450k iterations"; the paper's 3e-5 -> 1e-5 at 200k ->
#   3e-6 at 375k is ``--lr-steps 200000,375000 --lr-factors 0.3333,0.1``);
# - models/colorization_train_val_v2.prototxt: crop_size 176, batch_size 40; no ``param`` blocks on the
#   convolutions (biases lr x1 and decayed, Caffe's defaults); BatchNorm ``batch_norm_param {}``
#   (moving_average_fraction 0.999: torch momentum 0.001); the loss ``SoftmaxCrossEntropyLoss`` with no
#   ``loss_param``: resources/softmax_cross_entropy_loss_layer.cpp divides by ``num`` only ("sum");
# - train/readme (d): the LMDB images are 256x256 (squashed); (1): init_v2.caffemodel from magic_init's
#   k-means initialisation.
# No detection split: it has neither fc6 / fc7 nor res4 / res5.
COLORNET_CARD = EncoderCard(
    name="colornet",
    family="vgg",
    pretrain=PretrainRecipe(176, 40, 500_000, 3e-5, (225_000, 450_000), (0.1, 0.01), (0.9, 0.99), 1e-3,
                            resize=256, resize_mode="squash", loss_reduction="sum", init="kmeans",
                            bias_lr_mult=1.0, bias_decay_mult=1.0, bn_momentum=0.001,
                            source="released colorization solver (train/solver.prototxt, "
                                   "models/colorization_train_val_v2.prototxt)"),
    pretrain_builtin=PretrainRecipe(64, 8, 150, 3e-4, (100, 130), (0.3, 0.1), (0.9, 0.99), 1e-3, resize=80,
                                    source="built-in default"),
    # Probe: "zhang", the released probe of the colorization paper this network comes from; its Resize
    # needs only a grid per tap (no published fixed kernels exist for this network, so "goyal" would be
    # our own rule). Grids keep about 9216 features per tap (64 x 12 x 12 ... 512 x 4 x 4).
    probe=ProbeDefaults(crop=224, weight_decay=5e-4, protocol="zhang",
                        grids={"conv1": 12, "conv2": 8, "conv3": 6, "conv4": 4, "conv5": 4}),
    transfer=TransferDefaults(
        crop=224, feature_tap="conv5", detection_tap=None, detection_head_stages=(), detection_roi=0,
        segmentation_tap="conv5", scopes={"fc8": (), "fc6-8": ("conv5",), "all": None}),
    description="the paper's colorization network (VGG-style)",
)


@register_model(card=COLORNET_CARD)
def colornet(out_channels: int = NUM_BINS) -> ColorNet:
    """The 32.2 M-parameter colorization network (paper Table 4); logits at 1/4 resolution."""
    return ColorNet(out_channels=out_channels)
