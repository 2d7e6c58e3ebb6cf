"""The few Caffe messages a ``.caffemodel`` needs, built in Python (no ``caffe.proto`` compile step).

A ``.caffemodel`` is a serialised ``caffe.NetParameter`` (BVLC caffe, ``src/caffe/proto/caffe.proto``).
Only the fields that carry weights are declared, with BVLC's field numbers; protobuf skips every
other field (convolution_param, phase, ...) as unknown:

* ``NetParameter``: ``name = 1``, ``layers = 2`` (the deprecated ``V1LayerParameter``), ``layer = 100``.
* ``LayerParameter``: ``name = 1``, ``type = 2`` (a string), ``bottom = 3``, ``top = 4``, ``blobs = 7``.
* ``LayerParameter.batch_norm_param = 139`` (``BatchNormParameter``: ``eps = 3``, default 1e-5).
* ``V1LayerParameter``: ``bottom = 2``, ``top = 3``, ``name = 4``, ``type = 5`` (an enum, read as an
  int: 4 CONVOLUTION, 14 INNER_PRODUCT, 39 DECONVOLUTION), ``blobs = 6``.
* ``BlobProto``: ``num = 1``, ``channels = 2``, ``height = 3``, ``width = 4`` (the legacy 4-D shape),
  ``data = 5`` and ``double_data = 8`` (packed floats / doubles), ``shape = 7`` (``BlobShape``:
  ``dim = 1``, packed int64).

The packed ``data`` / ``double_data`` fields are declared as ``bytes`` here: a packed repeated field and
a bytes field share the wire encoding (length-delimited), so protobuf hands us the raw little-endian
payload and numpy reads it without building tens of millions of Python floats (AlexNet's fc6 alone
holds 37.7 M). Caffe writes these fields packed (``[packed = true]`` in caffe.proto); a file with
unpacked floats would leave ``data`` empty, and :func:`blob_to_array` then reports the missing values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

_F = descriptor_pb2.FieldDescriptorProto
#: V1LayerParameter.LayerType values (caffe.proto) -> the V2 type strings.
V1_LAYER_TYPES = {4: "Convolution", 14: "InnerProduct", 39: "Deconvolution"}


def _message(file_proto, name: str, fields: list[tuple]) -> None:
    message = file_proto.message_type.add(name=name)
    for field_name, number, kind, label, type_name, packed in fields:
        entry = message.field.add(name=field_name, number=number, type=kind, label=label)
        if type_name:
            entry.type_name = type_name
        if packed:
            entry.options.packed = True


def _build_classes():
    opt, rep = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    proto = descriptor_pb2.FileDescriptorProto(
        name="ssl_colorize_caffe_minimal.proto", package="ssl_colorize_caffe", syntax="proto2")
    _message(proto, "BlobShape", [("dim", 1, _F.TYPE_INT64, rep, None, True)])
    _message(proto, "BlobProto", [
        ("num", 1, _F.TYPE_INT32, opt, None, False),
        ("channels", 2, _F.TYPE_INT32, opt, None, False),
        ("height", 3, _F.TYPE_INT32, opt, None, False),
        ("width", 4, _F.TYPE_INT32, opt, None, False),
        ("data", 5, _F.TYPE_BYTES, opt, None, False),
        ("shape", 7, _F.TYPE_MESSAGE, opt, ".ssl_colorize_caffe.BlobShape", False),
        ("double_data", 8, _F.TYPE_BYTES, opt, None, False),
    ])
    _message(proto, "BatchNormParameter", [("eps", 3, _F.TYPE_FLOAT, opt, None, False)])
    _message(proto, "LayerParameter", [
        ("name", 1, _F.TYPE_STRING, opt, None, False),
        ("type", 2, _F.TYPE_STRING, opt, None, False),
        ("bottom", 3, _F.TYPE_STRING, rep, None, False),
        ("top", 4, _F.TYPE_STRING, rep, None, False),
        ("blobs", 7, _F.TYPE_MESSAGE, rep, ".ssl_colorize_caffe.BlobProto", False),
        ("batch_norm_param", 139, _F.TYPE_MESSAGE, opt, ".ssl_colorize_caffe.BatchNormParameter", False),
    ])
    _message(proto, "V1LayerParameter", [
        ("bottom", 2, _F.TYPE_STRING, rep, None, False),
        ("top", 3, _F.TYPE_STRING, rep, None, False),
        ("name", 4, _F.TYPE_STRING, opt, None, False),
        ("type", 5, _F.TYPE_INT32, opt, None, False),
        ("blobs", 6, _F.TYPE_MESSAGE, rep, ".ssl_colorize_caffe.BlobProto", False),
    ])
    _message(proto, "NetParameter", [
        ("name", 1, _F.TYPE_STRING, opt, None, False),
        ("layers", 2, _F.TYPE_MESSAGE, rep, ".ssl_colorize_caffe.V1LayerParameter", False),
        ("layer", 100, _F.TYPE_MESSAGE, rep, ".ssl_colorize_caffe.LayerParameter", False),
    ])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
        make_class = message_factory.GetMessageClass
    else:
        make_class = message_factory.MessageFactory(pool).GetPrototype
    return {name: make_class(pool.FindMessageTypeByName(f"ssl_colorize_caffe.{name}"))
            for name in ("BlobShape", "BlobProto", "LayerParameter", "V1LayerParameter", "NetParameter")}


_CLASSES = _build_classes()
NetParameter = _CLASSES["NetParameter"]
BlobProto = _CLASSES["BlobProto"]


@dataclass
class CaffeLayer:
    """One layer of a caffemodel: its name, type string, input blob names and weights (float32 arrays)."""

    name: str
    type: str
    bottoms: list[str]
    blobs: list[np.ndarray] = field(default_factory=list)
    legacy_shapes: bool = False  # some blob had only num/channels/height/width (Caffe's 4-D padding with 1s)
    bn_eps: float = 1e-5  # BatchNorm layers: batch_norm_param.eps


def blob_to_array(blob) -> tuple[np.ndarray, bool]:
    """A BlobProto's values in its shape (float32), and whether the shape was the legacy 4-D one."""
    if blob.data:
        values = np.frombuffer(blob.data, dtype="<f4")
    else:
        values = np.frombuffer(blob.double_data, dtype="<f8").astype(np.float32)
    legacy = not blob.HasField("shape")
    shape = [blob.num, blob.channels, blob.height, blob.width] if legacy else list(blob.shape.dim)
    if int(np.prod(shape)) != values.size:
        raise ValueError(f"a blob declares shape {tuple(shape)} but holds {values.size} values (truncated file?)")
    return values.reshape(shape), legacy


def array_to_blob(array: np.ndarray):
    """A BlobProto holding ``array`` (float32, with its ``shape``): used to write caffemodels in tests."""
    blob = BlobProto()
    blob.shape.dim.extend(int(d) for d in array.shape)
    blob.data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return blob


def read_caffemodel(path: str | os.PathLike) -> list[CaffeLayer]:
    """The layers (with weights) of a ``.caffemodel``; ValueError names the file when it is not one."""
    with open(path, "rb") as handle:
        payload = handle.read()
    net = NetParameter()
    try:
        net.ParseFromString(payload)
    except (DecodeError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable Caffe model (truncated or another format): {exc}") from None
    layers: list[CaffeLayer] = []
    sources = [(layer.name, layer.type, layer) for layer in net.layer]
    sources += [(layer.name, V1_LAYER_TYPES.get(layer.type, f"V1:{layer.type}"), layer) for layer in net.layers]
    for name, kind, layer in sources:
        converted = CaffeLayer(name=name, type=kind, bottoms=list(layer.bottom))
        if kind == "BatchNorm" and layer.batch_norm_param.HasField("eps"):
            converted.bn_eps = float(layer.batch_norm_param.eps)
        for blob in layer.blobs:
            try:
                array, legacy = blob_to_array(blob)
            except ValueError as exc:
                raise ValueError(f"{path}: layer {name!r}: {exc}") from None
            converted.blobs.append(array)
            converted.legacy_shapes |= legacy
        layers.append(converted)
    if not any(layer.blobs for layer in layers):
        raise ValueError(f"{path} is not a Caffe model: it holds no layer with weights (truncated or another format)")
    return layers


def write_caffemodel(path: str | os.PathLike, layers: list[tuple[str, str, list[str], list[np.ndarray]]]) -> None:
    """Write (name, type, bottoms, blobs) layers as a V2 ``NetParameter`` (fixtures and tests)."""
    net = NetParameter(name="written by ssl_colorize")
    for name, kind, bottoms, blobs in layers:
        layer = net.layer.add(name=name, type=kind)
        layer.bottom.extend(bottoms)
        for array in blobs:
            layer.blobs.append(array_to_blob(array))
    with open(path, "wb") as handle:
        handle.write(net.SerializeToString())
