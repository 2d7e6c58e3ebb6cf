"""Encoders, created by name: ``create_model(name, **kwargs)``, ``list_models()`` (DESIGN.md).

Every encoder is an :class:`Encoder` with ``taps`` (name -> :class:`Tap`), ``probe_taps``,
``input_space``, ``output_stride``, ``forward(x)`` (313-way logits at native resolution),
``logits_at(x, size)`` (logits on the loss grid; :func:`resize_logits` does the same to logits already
computed), ``forward_taps(x, taps)`` and ``model_spec``; beside each factory its card
(:func:`get_card`, :func:`card_of`): what the suite knows about that encoder. Importing this package registers:

* ``alexnet_lab``: AlexNet on L, geometry "train" or "transfer" (docs/protocols.md section 3);
* ``colornet``: the paper's 32.2 M-parameter colorization network;
* ``resnet50_lab``: ResNet-50 on L (Goyal et al.), res5 at stride 1 by default;
* ``alexnet_rgb_torchvision``: torchvision's AlexNet on RGB, a feature extractor (no colour head).
"""

from ssl_colorize.models import alexnet, colornet, resnet, torchvision_alexnet  # noqa: F401  (registers the models)
from ssl_colorize.models.base import Encoder, Tap, resize_logits
from ssl_colorize.models.cards import EncoderCard, card_of, get_card
from ssl_colorize.models.registry import MODEL_REGISTRY, create_model, list_models, register_model

__all__ = ["Encoder", "EncoderCard", "card_of", "get_card", "MODEL_REGISTRY", "Tap", "create_model", "list_models", "register_model", "resize_logits"]
