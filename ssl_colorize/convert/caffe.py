"""``--format caffe``: Zhang et al.'s released ``.caffemodel`` files -> ``colornet`` or ``alexnet_lab``.

The file's layer names say which network it holds:

* the colorization network (``colorization_release_v2.caffemodel``, ``models/colorization_deploy_v2.prototxt``):
  ``bw_conv1_1`` (or ``conv1_1``), ``conv1_2``, BatchNorm ``conv1_2norm``, ... ``conv7_3norm``,
  Deconvolution ``conv8_1``, ``conv8_2``, ``conv8_3``, ``conv8_313`` -> colornet. ``conv8_313_rh`` (the
  softmax temperature, x2.606) and ``class8_ab`` (the fixed 313 -> ab decoding) are not weights of ours:
  colornet's logits are ``conv8_313``'s output.
* the AlexNet-Lab representation (``alexnet_release_450000_nobn_fc_rs.caffemodel``,
  ``models/alexnet_deploy_lab.prototxt``): ``data_l`` (a fixed 1x1 conv giving L - 50), ``conv1`` ... ``conv5``,
  ``fc6``, ``fc7`` (as convolutions, or InnerProduct reshaped) and, in files that kept them, BatchNorm
  layers reading a conv's output -> alexnet_lab; without BatchNorm layers (the ``nobn`` files folded
  them into the convs) ours are set to the identity. The file has no 313-way head: alexnet_lab's head
  stays at its seeded init (the representation benchmarks never read it).

Caffe's network sees ``L - 50``; ours sees ``(L - 50) / 100``, so conv1's weights are multiplied by 100
(docs/protocols.md section 1). A Caffe BatchNorm stores (mean x f, variance x f, f), f the moving-average
normaliser: the running statistics are the first two blobs divided by f (0 when f is 0, as Caffe does).
"""

from __future__ import annotations

import torch

from ssl_colorize.convert.caffe_schema import CaffeLayer, read_caffemodel
from ssl_colorize.convert.common import (
    BN_EPS, L_INPUT_SCALE, ConversionError, StateFiller, build_target, decoding_note)

# colornet: (block, number of convs); the file's conv names are conv{block}_{i}, BN conv{block}_{n}norm.
COLORNET_BLOCKS = ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3), (6, 3), (7, 3))
COLORNET_IGNORED = ("conv8_313_rh", "class8_ab")
ALEXNET_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
ALEXNET_IGNORED = ("fc8", "fc8_313", "conv8_313", "class8_313")


def _weights(layer: CaffeLayer, source: str, count: int) -> list[torch.Tensor]:
    if len(layer.blobs) < count:
        raise ConversionError(f"{source}: layer {layer.name!r} has {len(layer.blobs)} blobs, expected {count}")
    return [torch.from_numpy(blob.astype("float64")) for blob in layer.blobs[:count]]


def _bn_statistics(layer: CaffeLayer, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Caffe's BatchNorm blobs -> (running mean, running variance) for our eps (BN_EPS)."""
    mean, var, factor = _weights(layer, source, 3)
    f = float(factor.reshape(-1)[0])
    scale = 0.0 if f == 0 else 1.0 / f
    # Our BatchNorms use eps 1e-5: a file with another eps keeps var + eps unchanged.
    return (mean * scale).reshape(-1), (var * scale).reshape(-1) + (layer.bn_eps - BN_EPS)


def _put_conv(filler: StateFiller, ours: str, layer: CaffeLayer, source: str) -> None:
    weight, bias = _weights(layer, source, 2)
    reshape = layer.legacy_shapes or layer.type == "InnerProduct"
    filler.put(f"{ours}.weight", weight, layer.name, reshape=reshape)
    filler.put(f"{ours}.bias", bias.reshape(-1), layer.name)


def _check_all_used(layers: list[CaffeLayer], used: set[str], ignored: tuple[str, ...], source: str) -> None:
    for layer in layers:
        if layer.blobs and layer.name not in used and layer.name not in ignored:
            raise ConversionError(f"{source}: layer {layer.name!r} ({layer.type}) carries weights "
                                  "that this converter does not map")


def convert_colornet(layers: dict[str, CaffeLayer], source: str) -> tuple[torch.nn.Module, StateFiller, list[str]]:
    model = build_target("colornet")
    filler = StateFiller(model, source)
    used: set[str] = set()

    def need(name: str) -> CaffeLayer:
        if name not in layers:
            raise ConversionError(f"{source}: no layer {name!r} (expected the colorization_deploy_v2 layout)")
        used.add(name)
        return layers[name]

    for block, n_convs in COLORNET_BLOCKS:
        for i in range(1, n_convs + 1):
            name = f"conv{block}_{i}"
            if block == 1 and i == 1 and "bw_conv1_1" in layers:
                name = "bw_conv1_1"
            _put_conv(filler, f"conv{block}.conv{block}_{i}", need(name), source)
        mean, var = _bn_statistics(need(f"conv{block}_{n_convs}norm"), source)
        filler.put(f"conv{block}.bn.running_mean", mean, f"conv{block}_{n_convs}norm")
        filler.put(f"conv{block}.bn.running_var", var, f"conv{block}_{n_convs}norm")
    for name, ours in (("conv8_1", "conv8.conv8_1"), ("conv8_2", "conv8.conv8_2"), ("conv8_3", "conv8.conv8_3"),
                       ("conv8_313", "head")):
        _put_conv(filler, ours, need(name), source)
    filler.state["conv1.conv1_1.weight"] *= L_INPUT_SCALE
    _check_all_used(list(layers.values()), used, COLORNET_IGNORED, source)
    filler.check_complete()
    notes = ["conv1 x100 (Caffe input L - 50, ours (L - 50) / 100)",
             "logits are conv8_313 (before the x2.606 temperature and class8_ab decoding)"]
    if "class8_ab" in layers and layers["class8_ab"].blobs:
        notes.append(decoding_note(layers["class8_ab"].blobs[0], "class8_ab"))
    return model, filler, notes


def convert_alexnet(layers: dict[str, CaffeLayer], source: str) -> tuple[torch.nn.Module, StateFiller, list[str]]:
    model = build_target("alexnet_lab", geometry="transfer")
    filler = StateFiller(model, source)
    used: set[str] = set()
    notes = []
    for name in ALEXNET_LAYERS:
        if name not in layers:
            raise ConversionError(f"{source}: no layer {name!r} (expected the alexnet_deploy_lab layout)")
        _put_conv(filler, f"{name}.conv", layers[name], source)
        used.add(name)
        norms = [layer for layer in layers.values() if layer.type == "BatchNorm" and layer.bottoms == [name]]
        if norms:
            mean, var = _bn_statistics(norms[0], source)
            used.add(norms[0].name)
        else:  # a "nobn" file: the statistics were folded into the conv; ours becomes the identity
            channels = filler.state[f"{name}.bn.running_mean"].numel()
            mean, var = torch.zeros(channels), torch.full((channels,), 1.0 - BN_EPS, dtype=torch.float64)
        filler.put(f"{name}.bn.running_mean", mean, name)
        filler.put(f"{name}.bn.running_var", var, name)
    # data_l = w * L + b (w = 1, b = -50 in the release) feeds conv1; ours feeds (L - 50) / 100 = u,
    # so L = 100 u + 50 and conv1 sees 100 w u + (50 w + b): scale the weights, move the offset into the
    # bias (exact with conv1's zero padding in the transfer geometry; the offset is 0 in the release).
    w, b = 1.0, -50.0
    if "data_l" in layers and layers["data_l"].blobs:
        w_blob, b_blob = _weights(layers["data_l"], source, 2)
        w, b = float(w_blob.reshape(-1)[0]), float(b_blob.reshape(-1)[0])
        used.add("data_l")
    conv1 = filler.state["conv1.conv.weight"]
    filler.state["conv1.conv.bias"] += (50.0 * w + b) * conv1.sum(dim=(1, 2, 3))
    conv1 *= L_INPUT_SCALE * w
    _check_all_used(list(layers.values()), used, ALEXNET_IGNORED, source)
    kept = filler.check_complete(may_stay_initialised=("head.",))
    notes.append("conv1 x100 with data_l folded in (Caffe input L - 50, ours (L - 50) / 100)")
    if not any(layer.type == "BatchNorm" for layer in layers.values()):
        notes.append("no BatchNorm layers in the file (folded into the convs): ours set to the identity")
    if kept:
        notes.append("the 313-way head is not in the file: left at the seeded init")
    return model, filler, notes


def convert(src: str) -> tuple[torch.nn.Module, StateFiller, list[str]]:
    """Read ``src`` and fill the network its layer names describe; returns (model, filled state, notes)."""
    try:
        layers = {layer.name: layer for layer in read_caffemodel(src)}
    except (OSError, ValueError) as exc:
        raise ConversionError(str(exc)) from None
    if "bw_conv1_1" in layers or "conv1_1" in layers:
        return convert_colornet(layers, str(src))
    if "conv1" in layers:
        return convert_alexnet(layers, str(src))
    names = [name for name, layer in layers.items() if layer.blobs][:4]
    raise ConversionError(f"{src}: neither the colorization network (bw_conv1_1 ...) nor AlexNet-Lab (conv1 ...); "
                          f"its first weighted layers are {names}")
