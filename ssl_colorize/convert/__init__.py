"""Released models in, any benchmark out: convert published colorization weights to our checkpoints.

``python -m ssl_colorize.convert --format FORMAT SRC --out DEST.pth`` writes a self-describing checkpoint
that ``ssl_colorize.checkpoint.load_encoder(DEST)`` rebuilds, so every benchmark takes it as
``--checkpoint DEST.pth``. Formats (one module each; docs/released-models.md lists the files):

* ``eccv16``: the colorizers package's ECCV16 PyTorch state dict -> colornet (:mod:`.eccv16`);
* ``caffe``: Zhang et al.'s ``.caffemodel`` files -> colornet or alexnet_lab (:mod:`.caffe`, read
  against the minimal schema in :mod:`.caffe_schema`);
* ``vissl``: VISSL's colorization AlexNet / ResNet-50 trunks -> alexnet_lab / resnet50_lab (:mod:`.vissl`).
"""

from __future__ import annotations

FORMATS = ("eccv16", "caffe", "vissl")


def converter(fmt: str):
    """The ``convert(src) -> (model, filled state, notes)`` function of format ``fmt``."""
    if fmt == "eccv16":
        from ssl_colorize.convert.eccv16 import convert
    elif fmt == "caffe":
        from ssl_colorize.convert.caffe import convert
    elif fmt == "vissl":
        from ssl_colorize.convert.vissl import convert
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    return convert
