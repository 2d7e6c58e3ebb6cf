"""``--format eccv16``: the PyTorch port's ECCV16 colorizer (richzhang/colorization, colorizers/eccv16.py).

The port's state dict (``colorization_release_v2-9b330a0b.pth``) holds ``model1`` ... ``model8`` as
nn.Sequential indices: in blocks 1-7 the convolutions sit at even indices (0, 2, 4) with ReLUs between
and a BatchNorm *with affine* last (index 4 in two-conv blocks, 6 in three-conv ones); ``model8`` is the
4x4 transposed conv (0), two 3x3 convs (2, 4) and the 313-way 1x1 conv (6), then ``model_out`` maps the
softmax to ab (a fixed decoding matrix, not converted: decoding lives in ssl_colorize.targets).

The port normalises L as ours does, (L - 50) / 100, so conv1 is copied unchanged. Each affine
BatchNorm becomes our plain BatchNorm's running statistics plus a per-channel sign folded into the
next convolution's input channels (:func:`affine_bn_as_plain`): colornet then computes the port's
``model8`` output, the 313 logits before its softmax, exactly.
"""

from __future__ import annotations

import torch

from ssl_colorize.convert.common import (
    ConversionError, StateFiller, affine_bn_as_plain, build_target, decoding_note)
from ssl_colorize.convert.torch_files import load_tensor_dict

#: (block, number of 3x3 convs) of the port's model1 ... model7 (and of our colornet's conv1 ... conv7).
BLOCKS = ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3), (6, 3), (7, 3))
TARGET = "colornet"
PORT_AB_SCALE = 110.0  # the port's unnormalize_ab: ab = model_out(...) * 110


def convert(src: str) -> tuple[torch.nn.Module, StateFiller, list[str]]:
    """Fill a colornet from the port's state dict at ``src``; returns (model, filled state, notes)."""
    released = load_tensor_dict(src)
    if "model1.0.weight" not in released:
        raise ConversionError(f"{src} is not the colorizers eccv16 state dict (no 'model1.0.weight' entry)")

    def take(key: str) -> torch.Tensor:
        if key not in released:
            raise ConversionError(f"{src}: no {key!r} in the file (expected the colorizers eccv16 layout)")
        return released[key]

    model = build_target(TARGET)
    filler = StateFiller(model, str(src))
    signs = None  # the previous BatchNorm's per-channel signs, folded into the next conv's inputs
    for block, n_convs in BLOCKS:
        for i in range(1, n_convs + 1):
            layer = f"model{block}.{2 * (i - 1)}"
            ours = f"conv{block}.conv{block}_{i}"
            filler.put(f"{ours}.weight", take(f"{layer}.weight"), layer)
            filler.put(f"{ours}.bias", take(f"{layer}.bias"), layer)
            if i == 1 and signs is not None:
                filler.state[f"{ours}.weight"] *= signs.view(1, -1, 1, 1).to(filler.state[f"{ours}.weight"].dtype)
        layer = f"model{block}.{2 * n_convs}"
        signs, mean, var = affine_bn_as_plain(take(f"{layer}.weight"), take(f"{layer}.bias"),
                                              take(f"{layer}.running_mean"), take(f"{layer}.running_var"),
                                              layer=layer)
        filler.put(f"conv{block}.bn.running_mean", mean, layer)
        filler.put(f"conv{block}.bn.running_var", var, layer)
    for index, ours in ((0, "conv8.conv8_1"), (2, "conv8.conv8_2"), (4, "conv8.conv8_3"), (6, "head")):
        layer = f"model8.{index}"
        filler.put(f"{ours}.weight", take(f"{layer}.weight"), layer)
        filler.put(f"{ours}.bias", take(f"{layer}.bias"), layer)
    # A transposed conv stores (in, out, kh, kw): the signs scale its dim 0, the input channels.
    weight = filler.state["conv8.conv8_1.weight"]
    weight *= signs.view(-1, 1, 1, 1).to(weight.dtype)
    filler.check_complete()
    notes = ["affine BatchNorms folded into running statistics and the next conv's input signs",
             "model_out (the fixed 313 -> ab decoding) not converted: ssl_colorize decodes with targets"]
    if "model_out.weight" in released:
        notes.append(decoding_note(released["model_out.weight"], "model_out", scale=PORT_AB_SCALE))
    return model, filler, notes
