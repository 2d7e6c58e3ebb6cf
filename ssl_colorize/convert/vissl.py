"""``--format vissl``: VISSL's model-zoo colorization trunks -> ``alexnet_lab`` / ``resnet50_lab``.

VISSL (facebookresearch/vissl) stores the trunk under ``classy_state_dict -> base_model -> model -> trunk``
in its own checkpoints; its converted model-zoo files (``converted_alexnet_colorization_in1k_pretext.torch``,
``converted_vissl_rn50_colorization_in1k_goyal19.torch``) hold it under ``model_state_dict``. Both are read;
keys may carry ``trunk.`` / ``base_model.`` prefixes. The trunk's modules are ``_feature_blocks``:

* AlexNet (``vissl/models/trunks/alexnet_colorization.py``): ``_feature_blocks.{0,2,4,5,6}`` are
  conv1 ... conv5, each ``.0`` a conv and ``.1`` a BatchNorm *with affine* before the ReLU; the pools have no
  padding and floor rounding, which equal our "transfer" geometry at 227 px (55 -> 27 -> 13 -> 6). No fc6 /
  fc7 / head: ours stay at the seeded init (the probe reads conv1 ... conv5). Each affine BN becomes our
  plain BN's statistics, a negative gamma flipping the sign of its conv's output channel.
* ResNet-50 (``vissl/models/trunks/resnext.py``, torchvision's Bottleneck): ``_feature_blocks.conv1`` /
  ``bn1`` / ``layer1`` ... ``layer4`` -> our ``conv1.conv`` / ``conv1.bn`` / ``res2`` ... ``res5`` (the same
  module layout inside). The 313-way head is not in the trunk: seeded init. Both run res5 at stride 1
  without dilation (VISSL's ``LAYER4_STRIDE: 1``), so every tap equals VISSL's features.

Input: VISSL feeds OpenCV's 8-bit L rescaled, ``round(L * 255 / 100) * 100 / 255 - 50``
(``ImgPil2LabTensor``), i.e. L - 50 quantised to steps of 100 / 255 = 0.39 L units; ours is the
unquantised ``(L - 50) / 100``, so conv1's weights are multiplied by 100. The residual difference is the
quantisation itself: at most +-0.196 L units per pixel (0.2% of the L range), which a converted model
sees as a small input noise; it is not reproduced (docs/released-models.md).
"""

from __future__ import annotations

import torch

from ssl_colorize.convert.common import (
    L_INPUT_SCALE, ConversionError, StateFiller, affine_bn_as_plain, build_target)
from ssl_colorize.convert.torch_files import load_torch

#: VISSL AlexNet feature-block index -> our stage.
ALEXNET_BLOCKS = {0: "conv1", 2: "conv2", 4: "conv3", 5: "conv4", 6: "conv5"}
PREFIXES = ("module.", "trunk.", "base_model.", "_feature_blocks.")


def find_trunk(data, src: str) -> dict[str, torch.Tensor]:
    """The trunk's ``name -> tensor`` dict with the ``_feature_blocks.`` (and wrapper) prefixes removed."""
    nested = data
    descended = True
    while descended and isinstance(nested, dict):
        descended = False
        for key in ("classy_state_dict", "model_state_dict", "base_model", "model", "trunk"):
            if isinstance(nested.get(key), dict):
                nested, descended = nested[key], True
                break
    if not isinstance(nested, dict) or not any(isinstance(k, str) and "_feature_blocks." in k for k in nested):
        raise ConversionError(f"{src} is not a VISSL checkpoint (no classy_state_dict -> base_model -> model "
                              "-> trunk or model_state_dict with _feature_blocks entries)")
    trunk = {}
    for key, value in nested.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor) and "_feature_blocks." in key):
            continue
        if key.startswith(("heads.", "head.")):
            continue
        name = key
        while name.startswith(PREFIXES):
            name = name.split(".", 1)[1]
        trunk[name] = value
    return trunk


def convert_alexnet(trunk: dict[str, torch.Tensor], src: str) -> tuple[torch.nn.Module, StateFiller, list[str]]:
    model = build_target("alexnet_lab", geometry="transfer")
    filler = StateFiller(model, src)

    def take(key: str) -> torch.Tensor:
        if key not in trunk:
            raise ConversionError(f"{src}: no '_feature_blocks.{key}' in the trunk (expected VISSL's "
                                  "alexnet_colorization layout)")
        return trunk[key]

    for index, stage in ALEXNET_BLOCKS.items():
        conv, bn = f"{index}.0", f"{index}.1"
        filler.put(f"{stage}.conv.weight", take(f"{conv}.weight"), f"_feature_blocks.{conv}")
        filler.put(f"{stage}.conv.bias", take(f"{conv}.bias"), f"_feature_blocks.{conv}")
        signs, mean, var = affine_bn_as_plain(take(f"{bn}.weight"), take(f"{bn}.bias"), take(f"{bn}.running_mean"),
                                              take(f"{bn}.running_var"), layer=f"_feature_blocks.{bn}")
        # BN directly after the conv: a negative gamma flips the conv's output channel and the mean.
        filler.put(f"{stage}.bn.running_mean", signs * mean, f"_feature_blocks.{bn}")
        filler.put(f"{stage}.bn.running_var", var, f"_feature_blocks.{bn}")
        for key, shape in ((f"{stage}.conv.weight", (-1, 1, 1, 1)), (f"{stage}.conv.bias", (-1,))):
            filler.state[key] *= signs.view(shape).to(filler.state[key].dtype)
    filler.state["conv1.conv.weight"] *= L_INPUT_SCALE
    kept = filler.check_complete(may_stay_initialised=("fc6.", "fc7.", "head."))
    return model, filler, ["conv1 x100 (VISSL input: 8-bit L rescaled - 50; ours (L - 50) / 100)",
                           "affine BatchNorms folded into running statistics and conv signs",
                           f"not in the VISSL trunk, left at the seeded init: {', '.join(kept)}"]


def convert_resnet(trunk: dict[str, torch.Tensor], src: str) -> tuple[torch.nn.Module, StateFiller, list[str]]:
    model = build_target("resnet50_lab")
    filler = StateFiller(model, src)
    for key, value in trunk.items():
        if key.startswith("conv1."):
            ours = "conv1.conv." + key.removeprefix("conv1.")
        elif key.startswith("bn1."):
            ours = "conv1.bn." + key.removeprefix("bn1.")
        elif key.startswith("layer") and key[5:6] in "1234" and key[5:6]:
            ours = f"res{int(key[5]) + 1}" + key[6:]
        else:
            continue  # avgpool / flatten carry nothing
        if ours.endswith("num_batches_tracked"):
            continue
        filler.put(ours, value, f"_feature_blocks.{key}")
    filler.state["conv1.conv.weight"] *= L_INPUT_SCALE
    kept = filler.check_complete(may_stay_initialised=("head.",))
    return model, filler, ["conv1 x100 (VISSL input: 8-bit L rescaled - 50; ours (L - 50) / 100)",
                           f"not in the VISSL trunk, left at the seeded init: {', '.join(kept)}"]


def convert(src: str) -> tuple[torch.nn.Module, StateFiller, list[str]]:
    """Read the VISSL checkpoint ``src`` and fill the trunk its keys describe."""
    trunk = find_trunk(load_torch(src), str(src))
    if "conv1.weight" in trunk:
        return convert_resnet(trunk, str(src))
    if "0.0.weight" in trunk:
        return convert_alexnet(trunk, str(src))
    raise ConversionError(f"{src}: a VISSL trunk that is neither alexnet_colorization (_feature_blocks.0.0) "
                          f"nor a ResNet (_feature_blocks.conv1); first keys {list(trunk)[:3]}")
