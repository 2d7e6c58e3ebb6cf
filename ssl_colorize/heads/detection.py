"""Faster R-CNN on an encoder (torchvision's, no pretrained weights: nothing is downloaded).

The split comes from the encoder's card (``card_of(encoder).transfer``): the backbone is the encoder up
to ``detection_tap``; each proposal is RoI-pooled (RoIAlign) to ``detection_roi`` x ``detection_roi``
on it; the box head is the encoder's own ``detection_head_stages`` (:class:`EncoderBoxHead`).
AlexNet: conv5 backbone (stride 16), 6x6 RoIs -- where Fast R-CNN replaced pool5 by RoI max pooling --
and fc6 / fc7 as the box head (fc6, a 6x6 convolution applied to a 6x6 map, is exactly a Linear
256*6*6 -> 4096 with the convolution's weights); ResNet-50: the "C4" layout without FPN, res4 backbone,
14x14 RoIs, res5 + global average pooling as the box head. The stage modules are reused as they are, so
the fine-tuned fc6 / fc7 are the encoder's (and its folded BatchNorms come along).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from tqdm import tqdm

from ssl_colorize.data.voc import VOC_CLASSES, boxes_to_inclusive
from ssl_colorize.models.cards import card_of


class EncoderBackbone(nn.Module):
    """The encoder up to ``tap``, as a Faster R-CNN backbone (``out_channels`` as torchvision wants)."""

    def __init__(self, encoder: nn.Module, tap: str):
        super().__init__()
        self.encoder = encoder
        self.tap = tap
        self.out_channels = encoder.taps[tap].channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("0", self.encoder.forward_taps(x, [self.tap])[self.tap])])


class EncoderBoxHead(nn.Module):
    """A TwoMLPHead-like box head made of encoder stages applied to RoI-pooled maps, then pooled flat.

    AlexNet: stages (fc6, fc7) on (R, 256, 6, 6): fc6's 6x6 convolution gives (R, 4096, 1, 1), i.e.
    a Linear 9216 -> 4096 with the convolution's weights; fc7 a Linear 4096 -> 4096. ResNet-50: res5
    on (R, 1024, 14, 14), then the spatial mean. The stages are the encoder's own modules (shared).
    """

    def __init__(self, stages: list[nn.Module], out_channels: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)


def has_detection_split(encoder: nn.Module) -> bool:
    return card_of(encoder).transfer.detection_tap is not None


def detector_parts(encoder: nn.Module) -> tuple[EncoderBackbone, MultiScaleRoIAlign, EncoderBoxHead, str]:
    """(backbone, RoI pooling, box head, description) from the encoder's card.

    ValueError when the card has no detection split (``detection_tap`` None).
    """
    card = card_of(encoder)
    transfer = card.transfer
    if transfer.detection_tap is None:
        raise ValueError(f"encoder {card.name} has no detection split")
    stages = dict(encoder.stages())
    head_stages = list(transfer.detection_head_stages)
    backbone = EncoderBackbone(encoder, transfer.detection_tap)
    pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=transfer.detection_roi, sampling_ratio=2)
    head = EncoderBoxHead([stages[name] for name in head_stages], encoder.taps[head_stages[-1]].channels)
    roi = transfer.detection_roi
    return backbone, pool, head, f"{transfer.detection_tap} backbone, RoIAlign {roi}x{roi}, {'/'.join(head_stages)} box head"


def build_detector(encoder: nn.Module, *, train_sizes: Sequence[int], max_size: int, anchors: Sequence[int],
                   rpn_train_proposals: int, rpn_test_proposals: int, score_thresh: float, detections_per_image: int,
                   rois_per_image: int) -> tuple[FasterRCNN, str]:
    """Faster R-CNN on the encoder: a new RPN head (torchvision's N(0, 0.01) init) and a new box
    predictor (21 classes with background, N(0, 0.01) / N(0, 0.001) as in Fast R-CNN).

    The detector's GeneralizedRCNNTransform gets image_mean 0 and image_std 1 (identity): images are
    given in the encoder's own input units, which the encoder normalises itself. It still resizes
    (a random shorter side from ``train_sizes`` per image, the longer at most ``max_size``) and pads.
    """
    backbone, pool, head, description = detector_parts(encoder)
    anchor_generator = AnchorGenerator(sizes=(tuple(anchors),), aspect_ratios=((0.5, 1.0, 2.0),))
    predictor = FastRCNNPredictor(head.out_channels, len(VOC_CLASSES) + 1)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    channels = encoder.in_chans
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=tuple(train_sizes),
        max_size=int(max_size),
        image_mean=[0.0] * channels,  # identity: the encoder normalises its own input
        image_std=[1.0] * channels,
        rpn_anchor_generator=anchor_generator,
        rpn_post_nms_top_n_train=rpn_train_proposals,
        rpn_post_nms_top_n_test=rpn_test_proposals,
        rpn_pre_nms_top_n_test=max(1000, rpn_test_proposals),
        box_roi_pool=pool,
        box_head=head,
        box_predictor=predictor,
        box_score_thresh=score_thresh,
        box_detections_per_img=detections_per_image,
        box_batch_size_per_image=rois_per_image,
    )
    return model, description


@torch.no_grad()
def detect_all(model: FasterRCNN, loader, to_inputs, skipped=lambda items: None) -> dict[int, tuple]:
    """index -> (devkit boxes (1-based inclusive), scores, labels 0..19) of every image of a loader of
    ``DetectionImages`` batches; ``to_inputs(images)``: the model's input tensors; ``skipped`` gets each
    batch's undecodable files."""
    model.eval()
    found = {}
    for images, _, indices, skipped_items in tqdm(loader, desc="test", unit="batch", mininterval=2):
        skipped(skipped_items)
        if not images:
            continue
        for index, out in zip(indices, model(to_inputs(images))):
            found[index] = (boxes_to_inclusive(out["boxes"].double().cpu().numpy()),
                            out["scores"].double().cpu().numpy(), out["labels"].cpu().numpy() - 1)
    return found
