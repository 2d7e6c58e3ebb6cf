"""Fast R-CNN on an encoder, as released (rbgirshick/fast-rcnn; the paper's detection protocol,
docs/protocols.md section 5): RoI max pooling over precomputed proposals, the encoder's own head
stages, a softmax classifier and class-specific box regression.

The split comes from the encoder's card (``card_of(encoder).transfer``): the backbone is the encoder up
to ``detection_tap`` (AlexNets: conv5, stride 16); each RoI is max-pooled by ``torchvision.ops.roi_pool``
(Caffe's ROIPooling: the same rounding of the RoI to feature cells) to ``detection_roi`` x
``detection_roi`` at spatial scale 1 / the tap's stride (``models/CaffeNet/train.prototxt``, roi_pool5:
pooled_w / pooled_h 6, spatial_scale 0.0625); then the card's ``detection_head_stages`` (fc6, fc7), each
followed by dropout 0.5 when the card lists it in ``dropout_after`` (train.prototxt drop6 / drop7,
dropout_ratio 0.5); then ``cls_score`` (21 outputs, weights N(0, 0.01)) and ``bbox_pred`` (84 outputs,
N(0, 0.001)), biases 0 (train.prototxt weight_filler / bias_filler).

Coordinates are Fast R-CNN's: 0-based inclusive pixel indices ``[x1 y1 x2 y2]``, so widths are
``x2 - x1 + 1`` (lib/utils/cython_bbox.pyx ``bbox_overlaps``; py-faster-rcnn's ``bbox_transform``; the
first release's ``roidb._compute_targets`` used ``x2 - x1 + EPS``, which is degenerate for one-pixel
proposals). The released values, each with its file and field:

=====================================  =========================================================
RoIs per minibatch 128 over 2 images   lib/fast_rcnn/config.py TRAIN.BATCH_SIZE, TRAIN.IMS_PER_BATCH
foreground fraction 0.25               TRAIN.FG_FRACTION (``np.round(0.25 * 64)`` = 16 per image)
foreground IoU >= 0.5                  TRAIN.FG_THRESH
background IoU in [0.1, 0.5)           TRAIN.BG_THRESH_LO, TRAIN.BG_THRESH_HI
regression examples IoU >= 0.5         TRAIN.BBOX_THRESH
targets normalised per class           lib/roi_data_layer/roidb.py ``add_bbox_regression_targets``
                                       (mean / std over the training RoIs, flipped copies included)
loss: softmax + smooth L1 (/ RoIs)     train.prototxt loss_cls SoftmaxWithLoss, loss_bbox SmoothL1Loss
test: score > 0.05, NMS 0.3, 100/img   lib/fast_rcnn/test.py ``test_net`` (thresh, max_per_image),
                                       config.py TEST.NMS
=====================================  =========================================================

Every encoder layer trains: the original CaffeNet prototxt froze conv1 (``lr_mult: 0``), the
self-supervised evaluation protocol does not (SimuJenni/fast-rcnn, a fork set up for it:
``models/CaffeNet/train.prototxt`` conv1 lr_mult 1, ``solver.prototxt`` stepsize 50000,
``experiments/cfgs/multiscale.yml`` TRAIN.SCALES 480..1200, TEST.SCALES [600], MAX_SIZE 2000). Not
reproduced: test.py's ``DEDUP_BOXES`` (RoIs falling on the same feature cells scored once: a speed-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, box_iou, roi_pool
from tqdm import tqdm

from ssl_colorize.data.proposals import FastRCNNImages, devkit_to_pixels, pixels_to_devkit, scaled_size
from ssl_colorize.data.voc import VOC_CLASSES, DetectionRecord
from ssl_colorize.heads.detection import EncoderBoxHead
from ssl_colorize.models.cards import card_of

NUM_CLASSES = len(VOC_CLASSES) + 1  # the background is class 0
ROIS_PER_BATCH = 128  # config.py TRAIN.BATCH_SIZE
IMAGES_PER_BATCH = 2  # config.py TRAIN.IMS_PER_BATCH
FG_FRACTION = 0.25  # config.py TRAIN.FG_FRACTION
FG_THRESH = 0.5  # config.py TRAIN.FG_THRESH
BG_THRESH_HI, BG_THRESH_LO = 0.5, 0.1  # config.py TRAIN.BG_THRESH_HI / TRAIN.BG_THRESH_LO
BBOX_THRESH = 0.5  # config.py TRAIN.BBOX_THRESH
TEST_NMS = 0.3  # config.py TEST.NMS
TEST_SCORE_THRESH = 0.05  # test.py test_net(thresh=0.05)
MAX_PER_IMAGE = 100  # test.py test_net(max_per_image=100)
DROPOUT = 0.5  # train.prototxt drop6 / drop7 dropout_ratio


# ----------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------

def _continuous(boxes: torch.Tensor) -> torch.Tensor:
    """0-based inclusive pixels -> continuous corners (x2 + 1), where torchvision's box ops agree with
    the released "+ 1" areas."""
    return boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


def pixel_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of 0-based inclusive boxes (cython_bbox.bbox_overlaps: areas (x2 - x1 + 1)(y2 - y1 + 1))."""
    return box_iou(_continuous(a), _continuous(b))


def encode_boxes(rois: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Regression targets (dx, dy, dw, dh) taking each RoI to its ground-truth box (both (N, 4) pixels)."""
    widths, heights = rois[:, 2] - rois[:, 0] + 1, rois[:, 3] - rois[:, 1] + 1
    gt_widths, gt_heights = gt[:, 2] - gt[:, 0] + 1, gt[:, 3] - gt[:, 1] + 1
    dx = (gt[:, 0] + 0.5 * gt_widths - rois[:, 0] - 0.5 * widths) / widths
    dy = (gt[:, 1] + 0.5 * gt_heights - rois[:, 1] - 0.5 * heights) / heights
    return torch.stack((dx, dy, torch.log(gt_widths / widths), torch.log(gt_heights / heights)), 1)


def decode_boxes(rois: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`encode_boxes`: (N, 4) RoIs and (N, 4K) deltas -> (N, 4K) boxes in pixels."""
    widths, heights = rois[:, 2:3] - rois[:, 0:1] + 1, rois[:, 3:4] - rois[:, 1:2] + 1
    ctr_x, ctr_y = rois[:, 0:1] + 0.5 * widths, rois[:, 1:2] + 0.5 * heights
    dx, dy, dw, dh = deltas[:, 0::4], deltas[:, 1::4], deltas[:, 2::4], deltas[:, 3::4]
    pred_x, pred_y = dx * widths + ctr_x, dy * heights + ctr_y
    pred_w, pred_h = torch.exp(dw) * widths, torch.exp(dh) * heights
    out = torch.empty_like(deltas)
    out[:, 0::4] = pred_x - 0.5 * pred_w
    out[:, 1::4] = pred_y - 0.5 * pred_h
    out[:, 2::4] = pred_x + 0.5 * pred_w - 1  # back to inclusive corners
    out[:, 3::4] = pred_y + 0.5 * pred_h - 1
    return out


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip (N, 4K) pixel boxes to the image (test.py ``_clip_boxes``: 0 .. width - 1, 0 .. height - 1)."""
    out = boxes.clone()
    out[:, 0::4] = out[:, 0::4].clamp(0, width - 1)
    out[:, 1::4] = out[:, 1::4].clamp(0, height - 1)
    out[:, 2::4] = out[:, 2::4].clamp(0, width - 1)
    out[:, 3::4] = out[:, 3::4].clamp(0, height - 1)
    return out


# ----------------------------------------------------------------------------------------------
# Training RoIs: the released roidb (ground truth + proposals), targets, normalisation, sampling
# ----------------------------------------------------------------------------------------------

def training_objects(record: DetectionRecord, use_difficult: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth pixel boxes and labels 1..20 of a training record. The released fast-rcnn keeps
    difficult objects (pascal_voc.py ``_load_pascal_annotation`` reads every object);
    ``use_difficult=False`` leaves them out (py-faster-rcnn's ``use_diff`` False)."""
    keep = np.ones(len(record.labels), dtype=bool) if use_difficult else ~record.difficult
    return devkit_to_pixels(record.boxes[keep]), record.labels[keep] + 1


@dataclass
class RoISample:
    rois: np.ndarray  # (R, 4) pixels of the original image
    labels: np.ndarray  # (R,) 0..20
    bbox_targets: np.ndarray  # (R, 4) normalised targets (0 for the background)


class RoISampler:
    """The training roidb: per image, ground-truth boxes then proposals, each RoI's best IoU with the
    ground truth, its class and its normalised regression target; samples minibatch RoIs.

    ``__call__(index)`` draws one image's RoIs (minibatch.py ``_sample_rois``): up to
    ``round(FG_FRACTION * rois_per_image)`` foreground RoIs (IoU >= FG_THRESH) without replacement, the
    rest background (IoU in [BG_THRESH_LO, BG_THRESH_HI)), labels of the background set to 0; random
    draws come from torch's global generator.
    """

    def __init__(self, records: Sequence[DetectionRecord], proposals: Sequence[np.ndarray], *, rois_per_image: int,
                 use_difficult: bool = True):
        self.rois_per_image = int(rois_per_image)
        self.fg_per_image = int(np.round(FG_FRACTION * self.rois_per_image))
        self.boxes, self.overlaps, self.classes, raw_targets = [], [], [], []
        for record, props in zip(records, proposals):
            gt, gt_labels = training_objects(record, use_difficult)
            boxes = np.vstack([gt, np.asarray(props, dtype=np.float64).reshape(-1, 4)])
            overlaps = np.zeros(len(boxes))
            classes = np.zeros(len(boxes), dtype=np.int64)
            targets = np.zeros((len(boxes), 4))
            if len(gt):
                iou = pixel_iou(torch.from_numpy(boxes), torch.from_numpy(gt))
                best, assigned = iou.max(1)
                overlaps, assigned = best.numpy(), assigned.numpy()
                classes = np.where(overlaps > 0, gt_labels[assigned], 0)
                regress = overlaps >= BBOX_THRESH
                targets[regress] = encode_boxes(torch.from_numpy(boxes[regress]),
                                                torch.from_numpy(gt[assigned[regress]])).numpy()
            self.boxes.append(boxes.astype(np.float32))  # integer pixels: exact in float32
            self.overlaps.append(overlaps)
            self.classes.append(classes)
            raw_targets.append(targets)
        self.means, self.stds = target_statistics(raw_targets, self.classes, self.overlaps)
        self.targets = [np.where((o >= BBOX_THRESH)[:, None], (t - self.means[c]) / self.stds[c], 0.0)
                        .astype(np.float32) for t, c, o in zip(raw_targets, self.classes, self.overlaps)]

    def usable(self) -> list[int]:
        """Images with at least one foreground or background RoI (train.py ``filter_roidb``)."""
        return [i for i, o in enumerate(self.overlaps)
                if (o >= FG_THRESH).any() or ((o < BG_THRESH_HI) & (o >= BG_THRESH_LO)).any()]

    def select(self, indices: Sequence[int]) -> "RoISampler":
        """The sampler of a subset of the images (the statistics stay those of the whole set, as released)."""
        subset = object.__new__(RoISampler)
        subset.__dict__.update(self.__dict__)
        for name in ("boxes", "overlaps", "classes", "targets"):
            setattr(subset, name, [getattr(self, name)[i] for i in indices])
        return subset

    def __len__(self) -> int:
        return len(self.boxes)

    def __call__(self, index: int) -> RoISample:
        overlaps = self.overlaps[index]
        fg = np.flatnonzero(overlaps >= FG_THRESH)
        fg = fg[torch.randperm(len(fg))[: min(self.fg_per_image, len(fg))].numpy()]
        bg = np.flatnonzero((overlaps < BG_THRESH_HI) & (overlaps >= BG_THRESH_LO))
        bg = bg[torch.randperm(len(bg))[: min(self.rois_per_image - len(fg), len(bg))].numpy()]
        keep = np.concatenate([fg, bg]).astype(np.int64)
        labels = self.classes[index][keep].copy()
        labels[len(fg):] = 0
        targets = self.targets[index][keep].copy()
        targets[len(fg):] = 0.0
        return RoISample(self.boxes[index][keep], labels, targets)


def target_statistics(targets: Sequence[np.ndarray], classes: Sequence[np.ndarray], overlaps: Sequence[np.ndarray],
                      flipped: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (NUM_CLASSES, 4) mean and std of the regression targets of every RoI with IoU >=
    BBOX_THRESH (roidb.py ``add_bbox_regression_targets``). ``flipped``: the mirrored copies the released
    roidb appends count too (their dx is negated, so the mean dx is 0). A std of 0 (a class whose targets
    never vary, e.g. seen only as its ground-truth boxes) is replaced by 1, which leaves its targets as they are."""
    counts = np.zeros(NUM_CLASSES)
    sums = np.zeros((NUM_CLASSES, 4))
    squares = np.zeros((NUM_CLASSES, 4))
    for t, c, o in zip(targets, classes, overlaps):
        regress = (o >= BBOX_THRESH) & (c > 0)
        copies = [t[regress]] + ([t[regress] * np.array([-1.0, 1.0, 1.0, 1.0])] if flipped else [])
        for copy in copies:
            np.add.at(counts, c[regress], 1)
            np.add.at(sums, c[regress], copy)
            np.add.at(squares, c[regress], copy ** 2)
    counts = np.maximum(counts, 1e-14)[:, None]  # config.py EPS
    means = sums / counts
    stds = np.sqrt(np.maximum(squares / counts - means ** 2, 0.0))
    stds[stds < 1e-6] = 1.0
    means[0], stds[0] = 0.0, 1.0
    return means, stds


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class FastRCNN(nn.Module):
    """Encoder up to the card's detection tap, RoI max pooling, the card's head stages (dropout after
    those in ``dropout_after``), ``cls_score`` and ``bbox_pred``.

    ``forward(images, rois)``: images (N, C, H, W) in the encoder's input units, rois (R, 5)
    ``[image index, x1, y1, x2, y2]`` in pixels of those images -> (class logits (R, 21), box deltas
    (R, 84), normalised). ``bbox_means`` / ``bbox_stds`` (buffers) undo the normalisation at test (the
    released snapshot folds them into bbox_pred's weights, train.py ``snapshot``; the same numbers).
    """

    def __init__(self, encoder: nn.Module, dropout: float = DROPOUT):
        super().__init__()
        card = card_of(encoder)
        transfer = card.transfer
        if transfer.detection_tap is None:
            raise ValueError(f"encoder {card.name} has no detection split")
        self.encoder = encoder
        self.tap = transfer.detection_tap
        self.spatial_scale = 1.0 / encoder.taps[self.tap].stride
        self.roi_size = transfer.detection_roi
        named = dict(encoder.stages())
        stages: list[nn.Module] = []
        for name in transfer.detection_head_stages:
            stages.append(named[name])
            if name in transfer.dropout_after and dropout > 0:
                stages.append(nn.Dropout(dropout))
        self.head_names = tuple(transfer.detection_head_stages)
        self.head = EncoderBoxHead(stages, encoder.taps[self.head_names[-1]].channels)
        self.cls_score = nn.Linear(self.head.out_channels, NUM_CLASSES)
        self.bbox_pred = nn.Linear(self.head.out_channels, 4 * NUM_CLASSES)
        nn.init.normal_(self.cls_score.weight, std=0.01)  # train.prototxt cls_score weight_filler
        nn.init.normal_(self.bbox_pred.weight, std=0.001)  # train.prototxt bbox_pred weight_filler
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.register_buffer("bbox_means", torch.zeros(4 * NUM_CLASSES))
        self.register_buffer("bbox_stds", torch.ones(4 * NUM_CLASSES))

    def describe(self) -> str:
        drops = sum(isinstance(m, nn.Dropout) for m in self.head.stages)
        return (f"Fast R-CNN: {self.tap} backbone, RoI max pooling {self.roi_size}x{self.roi_size} at 1/"
                f"{round(1 / self.spatial_scale)}, {'/'.join(self.head_names)} head ({drops} dropout), "
                f"cls_score {NUM_CLASSES}, bbox_pred {4 * NUM_CLASSES}")

    def set_target_statistics(self, means: np.ndarray, stds: np.ndarray) -> None:
        self.bbox_means.copy_(torch.as_tensor(means, dtype=torch.float32).reshape(-1))
        self.bbox_stds.copy_(torch.as_tensor(stds, dtype=torch.float32).reshape(-1))

    def pool(self, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        features = self.encoder.forward_taps(images, [self.tap])[self.tap]
        return roi_pool(features, rois.to(features.dtype), output_size=self.roi_size, spatial_scale=self.spatial_scale)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.head(self.pool(images, rois))
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_loss(logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor,
                   bbox_targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """SoftmaxWithLoss (mean over RoIs) + SmoothL1Loss on the labelled class's four outputs, summed and
    divided by the number of RoIs (fast-rcnn's caffe SmoothL1Loss: ``asum / num``), background RoIs 0."""
    rois = labels.numel()
    fg = torch.nonzero(labels > 0).squeeze(1)
    columns = 4 * labels[fg, None] + torch.arange(4, device=labels.device)
    picked = deltas[fg[:, None], columns]
    box = F.smooth_l1_loss(picked, bbox_targets[fg], beta=1.0, reduction="sum") / max(rois, 1)
    return {"loss_cls": F.cross_entropy(logits, labels), "loss_bbox": box}


def image_batch(images: Sequence[torch.Tensor], scales: Sequence[float], to_input, pad: Sequence[float],
                device: torch.device) -> torch.Tensor:
    """uint8 images -> one padded batch in the encoder's input units: each converted (``to_input``),
    resized by its scale (bilinear, as cv2.INTER_LINEAR), placed top-left, the rest ``pad`` (the value
    the encoder normalises to 0: blob.py ``im_list_to_blob`` pads mean-subtracted images with 0)."""
    converted = []
    for image, scale in zip(images, scales):
        x = to_input(image.to(device, non_blocking=True)[None])
        size = scaled_size(x.shape[-2], x.shape[-1], scale)
        converted.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
    height = max(x.shape[-2] for x in converted)
    width = max(x.shape[-1] for x in converted)
    batch = torch.tensor(pad, dtype=converted[0].dtype, device=device).view(1, -1, 1, 1).repeat(
        len(converted), 1, height, width)
    for n, x in enumerate(converted):
        batch[n, :, : x.shape[-2], : x.shape[-1]] = x[0]
    return batch


def roi_batch(rois: Sequence[torch.Tensor], scales: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-image pixel RoIs of the original images -> (R, 5) [index, scaled box] (minibatch.py
    ``_project_im_rois``: the boxes times the image's scale)."""
    parts = [torch.cat((torch.full((len(r), 1), float(n)), r.double() * scale), 1)
             for n, (r, scale) in enumerate(zip(rois, scales))]
    return torch.cat(parts).float().to(device)


@torch.no_grad()
def detect(model: FastRCNN, image: torch.Tensor, rois: torch.Tensor, scale: float, to_input, pad: Sequence[float],
           device: torch.device, score_thresh: float = TEST_SCORE_THRESH, nms: float = TEST_NMS,
           max_per_image: int = MAX_PER_IMAGE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections of one image (test.py ``im_detect`` + ``test_net``): softmax scores, class-specific
    boxes decoded and clipped, per class score > ``score_thresh`` and NMS at ``nms``, then at most
    ``max_per_image`` over all classes. Returns devkit boxes (1-based inclusive), scores, labels 0..19."""
    height, width = image.shape[-2:]
    empty = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
    if len(rois) == 0:
        return empty
    logits, deltas = model(image_batch([image], [scale], to_input, pad, device), roi_batch([rois], [scale], device))
    scores = F.softmax(logits.double(), dim=1)
    deltas = deltas.double() * model.bbox_stds.double() + model.bbox_means.double()
    boxes = clip_boxes(decode_boxes(rois.to(device).double(), deltas), height, width)
    n_rois = len(rois)
    classes = torch.arange(1, NUM_CLASSES, device=device).repeat(n_rois)
    all_scores = scores[:, 1:].reshape(-1)
    all_boxes = boxes[:, 4:].reshape(n_rois * (NUM_CLASSES - 1), 4)
    keep = torch.nonzero(all_scores > score_thresh).squeeze(1)
    all_scores, all_boxes, classes = all_scores[keep], all_boxes[keep], classes[keep]
    keep = batched_nms(_continuous(all_boxes), all_scores, classes, nms)
    all_scores, all_boxes, classes = all_scores[keep], all_boxes[keep], classes[keep]
    if max_per_image > 0 and len(all_scores) > max_per_image:
        threshold = torch.sort(all_scores).values[-max_per_image]
        keep = all_scores >= threshold
        all_scores, all_boxes, classes = all_scores[keep], all_boxes[keep], classes[keep]
    return (pixels_to_devkit(all_boxes.cpu().numpy()), all_scores.cpu().numpy(), classes.cpu().numpy() - 1)


def training_set(records: Sequence[DetectionRecord], proposals: dict[str, np.ndarray], *, rois_per_image: int,
                 use_difficult: bool, scales: Sequence[int], max_size: int) -> FastRCNNImages:
    """The training items (their ``sampler`` holds the target statistics): the roidb of ``records`` with
    their proposals, images without a foreground or background RoI left out (train.py ``filter_roidb``).
    ValueError when no image is left."""
    sampler = RoISampler(records, [proposals[r.image_id] for r in records], rois_per_image=rois_per_image,
                         use_difficult=use_difficult)
    usable = sampler.usable()
    if not usable:
        raise ValueError(f"no training image has a RoI with IoU >= {BG_THRESH_LO} with its objects")
    return FastRCNNImages([records[i] for i in usable], train=True, scales=scales, max_size=max_size,
                          sampler=sampler.select(usable))


@torch.no_grad()
def detect_all(model: FastRCNN, loader, to_input, pad: Sequence[float], device: torch.device, *, score_thresh: float,
               nms: float, max_per_image: int, skipped=lambda items: None) -> dict[int, tuple]:
    """index -> (devkit boxes, scores, labels 0..19) of every image of a loader of test
    :class:`FastRCNNImages` (``skipped`` gets each batch's undecodable files)."""
    model.eval()
    found = {}
    for images, targets, indices, skipped_items in tqdm(loader, desc="test", unit="img", mininterval=2):
        skipped(skipped_items)
        for image, target, index in zip(images, targets, indices):
            found[index] = detect(model, image, target["rois"], target["scale"], to_input, pad, device,
                                  score_thresh=score_thresh, nms=nms, max_per_image=max_per_image)
    return found
