"""Encoder cards: what the suite knows about each encoder, kept beside its factory (DESIGN.md).

timm keeps a model's metadata (``default_cfgs``) beside the model; we do the same. A card holds the
pretraining recipes, the probe's defaults, the transfer geometry, the tap a detection or segmentation
head reads and the stages each fine-tuning scope trains. No module outside ``ssl_colorize/models/``
tests an encoder's name: it asks the card (:func:`get_card` by name, :func:`card_of` for a model).
Adding an encoder is one model file (factory + card, ``@register_model(card=...)``) plus its test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class PretrainRecipe:
    """A pretraining solver: crops, batch, iterations, Adam and the step schedule, and the details of
    the released training around them (each a ``ssl_colorize.pretrain`` option; docs/pretraining.md).

    ``resize_mode``: "squash" (both sides to ``resize``, aspect not kept: the released 256x256 LMDB) or
    "shorter" (the shorter side to ``resize``); ``loss_reduction``: "mean" over the loss grid's pixels or
    "sum" over each image's grid, mean over the images (``ssl_colorize.losses``); ``init``: "kmeans"
    (Kraehenbuehl et al.'s data-dependent init) or "default" (the factories' own); ``bias_lr_mult`` /
    ``bias_decay_mult``: Caffe's ``lr_mult`` / ``decay_mult`` of the bias blobs; ``bn_momentum``: torch's
    BatchNorm momentum (Caffe's ``moving_average_fraction`` 0.999 is 0.001). The defaults are the
    plain PyTorch choices.
    """

    crop: int
    batch_size: int
    steps: int
    lr: float
    lr_steps: tuple[int, ...]  # the step at which each lr_factors entry takes over
    lr_factors: tuple[float, ...]
    betas: tuple[float, float]
    weight_decay: float
    resize: int | None = 256
    source: str = ""  # the released file (and field) the values come from
    resize_mode: str = "shorter"
    loss_reduction: str = "mean"
    init: str = "default"
    bias_lr_mult: float = 1.0
    bias_decay_mult: float = 1.0
    bn_momentum: float = 0.1


@dataclass(frozen=True)
class ProbeDefaults:
    """Linear-probe defaults on real data (docs/protocols.md section 4; ssl_colorize.heads.probe_pool).

    ``protocol``: the default of ``--protocol`` ("zhang", "goyal" or "max"); ``grids``: tap -> side of
    the pooled grid of "zhang" and "max" (and the grid "goyal"'s kernel must reach); ``avg_pools``:
    tap -> (kernel, stride, padding) of "goyal" at ``crop``. A tap missing from either falls back to
    the rules of ssl_colorize.heads.probe_pool (about 9216 features).
    """

    crop: int
    weight_decay: float
    protocol: str = "zhang"
    grids: dict[str, int] = field(default_factory=dict)
    avg_pools: dict[str, tuple[int, int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class TransferDefaults:
    """Fine-tuning on VOC.

    ``model_kwargs``: construction arguments of the transfer geometry (the weights are unchanged);
    ``crop``: input side; ``feature_tap``: what a new classifier reads; ``detection_tap`` /
    ``detection_head_stages`` / ``detection_roi``: the Fast/Faster R-CNN split (backbone up to the tap,
    the box head made of those stages, RoI output size); ``segmentation_tap``: what the FCN scores;
    ``scopes``: stage names each ``--finetune`` scope trains besides the new head (None: all);
    ``dropout_after``: stages followed by dropout (p 0.5) when VOC classification fine-tunes them (the
    released ``feature_learning_tests/classification/dummy.prototxt`` has drop6 / drop7 after fc6 / fc7);
    ``detector``: the default ``--detector`` of VOC detection ("fast-rcnn": the paper's protocol over
    precomputed proposals; "faster-rcnn": the modern protocol with a learnt RPN).
    """

    crop: int
    feature_tap: str
    detection_tap: str | None  # None: no detection split for this encoder
    detection_head_stages: tuple[str, ...]
    detection_roi: int
    segmentation_tap: str
    scopes: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dropout_after: tuple[str, ...] = ()
    detector: str = "faster-rcnn"


@dataclass(frozen=True)
class EncoderCard:
    name: str
    family: str  # "alexnet", "vgg", "resnet": for table labels only, never for behaviour
    probe: ProbeDefaults
    transfer: TransferDefaults
    pretrain: PretrainRecipe | None = None  # the paper recipe (None: no colour head, not pretrainable)
    pretrain_builtin: PretrainRecipe | None = None  # the scaled-down schedule of the built-in default
    description: str = ""


_CARDS: dict[str, EncoderCard] = {}


def add_card(card: EncoderCard) -> None:
    if card.name in _CARDS:
        raise ValueError(f"encoder card {card.name!r} is registered twice")
    _CARDS[card.name] = card


def get_card(name: str) -> EncoderCard:
    """The card of a registered encoder; ValueError listing the known names otherwise."""
    from ssl_colorize.models.registry import list_models  # imports the model files (fills _CARDS)

    known = list_models()
    if name not in _CARDS:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(known)}")
    return _CARDS[name]


def card_of(model: nn.Module) -> EncoderCard:
    """The card of a model built by ``create_model`` (read from its ``model_spec``)."""
    spec = getattr(model, "model_spec", None)
    if not spec:
        raise ValueError(f"{type(model).__name__} was not built by create_model: it has no card")
    return get_card(spec["name"])


def pretrainable_models() -> list[str]:
    from ssl_colorize.models.registry import list_models

    return [name for name in list_models() if get_card(name).pretrain is not None]
