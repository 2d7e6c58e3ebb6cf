"""VOC metrics against independent references: scikit-learn, hand-worked devkit cases, hand confusion matrices."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, confusion_matrix

from ssl_colorize.voc_metrics import (
    ConfusionMatrix,
    Detections,
    GroundTruth,
    ap_from_pr,
    average_precision,
    box_iou_inclusive,
    classification_ap,
    detection_ap,
    iou_from_confusion,
    mean_ap,
)

# ----------------------------------------------------------------------------------------------
# Classification AP
# ----------------------------------------------------------------------------------------------


def test_classification_ap_equals_sklearn_on_non_ignored_samples():
    rng = np.random.default_rng(0)
    n, c = 60, 5
    labels = rng.choice([-1, 1, 0], size=(n, c), p=[0.6, 0.3, 0.1])
    labels[0] = 1  # every class has a positive
    scores = rng.normal(size=(n, c)) + 0.8 * (labels > 0)
    scores[:, 2] = np.round(scores[:, 2], 1)  # many ties in one class
    aps = classification_ap(scores, labels)
    for k in range(c):
        keep = labels[:, k] != 0
        expected = average_precision_score(labels[keep, k] > 0, scores[keep, k])
        assert aps[k] == pytest.approx(expected, abs=1e-12)


def test_ignored_labels_change_nothing_whatever_their_score():
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    labels = np.array([[1], [-1], [1], [-1]])
    base = classification_ap(scores, labels)[0]
    with_ignored = classification_ap(np.r_[scores, [[0.95]]], np.r_[labels, [[0]]])[0]
    assert with_ignored == base
    # by hand: ranking + - + -, precision at the positives 1 and 2/3, recall steps 1/2 each
    assert base == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_average_precision_ties_form_one_threshold():
    # a tie between a positive and a negative at the top: precision 1/2 at recall 1/2 whatever the order
    scores = np.array([0.9, 0.9, 0.1])
    assert average_precision(scores, np.array([True, False, True])) == pytest.approx(
        average_precision_score([1, 0, 1], scores))
    assert average_precision(scores, np.array([False, True, True])) == pytest.approx(
        average_precision(scores, np.array([True, False, True])))


def test_class_without_positive_is_nan_and_left_out_of_the_mean():
    scores = np.array([[0.2, 0.9], [0.8, 0.1]])
    labels = np.array([[-1, 1], [-1, -1]])
    aps = classification_ap(scores, labels)
    assert np.isnan(aps[0]) and aps[1] == 1.0
    assert mean_ap(aps) == 1.0


def test_classification_ap_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        classification_ap(np.zeros((2, 1)), np.array([[2], [1]]))


# ----------------------------------------------------------------------------------------------
# Detection AP (VOC2007 devkit rule), hand-worked
# ----------------------------------------------------------------------------------------------

def gt(boxes, labels, difficult=None):
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    return GroundTruth(boxes, np.asarray(labels), np.asarray(difficult if difficult is not None else [False] * len(labels)))


def det(boxes, scores, labels):
    return Detections(np.asarray(boxes, dtype=float).reshape(-1, 4), np.asarray(scores, dtype=float), np.asarray(labels))


A = [1, 1, 10, 10]          # 10 x 10
B = [31, 31, 40, 40]        # 10 x 10, far from A
A_SHIFT = [2, 1, 11, 10]    # IoU with A: 90 / 110


def test_inclusive_iou_by_hand():
    assert box_iou_inclusive(np.array(A, float), np.array([A_SHIFT], float))[0] == pytest.approx(90 / 110)
    # exactly 0.5: 10x10 inside a 10x20 box
    assert box_iou_inclusive(np.array(A, float), np.array([[1, 1, 10, 20]], float))[0] == pytest.approx(0.5)


def test_duplicate_detection_is_a_false_positive():
    # two objects; detections: A (TP, .9), duplicate of A (FP, .8), B (TP, .7)
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    truth = [gt([A, B], [0, 0])]
    dets = [det([A, A_SHIFT, B], [0.9, 0.8, 0.7], [0, 0, 0])]
    ap11 = detection_ap(dets, truth, num_classes=1)[0]
    assert ap11 == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)  # t = 0..0.5 -> 1; t = 0.6..1 -> 2/3
    area = detection_ap(dets, truth, num_classes=1, metric="area")[0]
    assert area == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


def test_difficult_objects_are_neither_counted_nor_penalised():
    # A is difficult. Detections: on A (.95, ignored), a false one (.6), on B (.5, TP).
    truth = [gt([A, B], [0, 0], [True, False])]
    dets = [det([A, [60, 60, 70, 70], B], [0.95, 0.6, 0.5], [0, 0, 0])]
    # one positive; after the ignored one: FP then TP -> precision 1/2 at recall 1
    assert detection_ap(dets, truth, num_classes=1)[0] == pytest.approx(0.5)
    assert detection_ap(dets, truth, num_classes=1, metric="area")[0] == pytest.approx(0.5)
    # had the difficult detection counted as a false positive, precision at recall 1 would be 1/3
    truth_counted = [gt([A, B], [0, 0], [False, False])]
    assert detection_ap(dets, truth_counted, num_classes=1)[0] != pytest.approx(0.5)


def test_no_detections_gives_zero_and_no_objects_gives_nan():
    truth = [gt([A], [0]), gt([B], [1], [True])]
    dets = [det([A], [0.9], [0]), det(np.zeros((0, 4)), [], [])]
    aps = detection_ap(dets, truth, num_classes=3)
    assert aps[0] == 1.0          # found
    assert np.isnan(aps[1])       # only a difficult object: nothing to count (devkit: 0/0)
    assert np.isnan(aps[2])       # no object at all
    none = detection_ap([det(np.zeros((0, 4)), [], []), det(np.zeros((0, 4)), [], [])], truth, num_classes=1)
    assert none[0] == 0.0         # objects but no detection


def test_ties_in_score_keep_the_input_order():
    truth = [gt([A], [0])]
    miss = [50, 50, 60, 60]
    first_right = detection_ap([det([A, miss], [0.7, 0.7], [0, 0])], truth, num_classes=1)[0]
    first_wrong = detection_ap([det([miss, A], [0.7, 0.7], [0, 0])], truth, num_classes=1)[0]
    assert first_right == pytest.approx(1.0)    # precision 1 at recall 1
    assert first_wrong == pytest.approx(0.5)    # precision 1/2 at recall 1


def test_iou_threshold_is_inclusive_and_greedy_matching_uses_the_best_overlap():
    truth = [gt([A], [0])]
    assert detection_ap([det([[1, 1, 10, 20]], [0.9], [0])], truth, num_classes=1)[0] == 1.0  # IoU exactly 0.5
    assert detection_ap([det([[1, 1, 10, 21]], [0.9], [0])], truth, num_classes=1)[0] == 0.0  # IoU 100/210
    # Two objects; the first detection covers both but overlaps A best and takes it; a second detection
    # whose best match is A again is a duplicate even though it overlaps C >= 0.5 too.
    C = [1, 1, 10, 12]  # IoU(A, C) = 100/120
    truth = [gt([A, C], [0, 0])]
    dets = [det([A, [1, 1, 10, 10]], [0.9, 0.8], [0, 0])]
    # TP then FP (its best overlap is A, already taken): precision 1, 1/2 at recall 1/2
    assert detection_ap(dets, truth, num_classes=1)[0] == pytest.approx(6 / 11)


def test_detections_in_other_images_and_classes_are_kept_apart():
    truth = [gt([A], [0]), gt([B], [1])]
    # class 0 detected in image 1 (which has no class-0 object) with a higher score: a false positive
    dets = [det([A], [0.5], [0]), det([B, B], [0.9, 0.8], [0, 1])]
    aps = detection_ap(dets, truth, num_classes=2)
    assert aps[1] == 1.0
    # class 0: FP (.9), TP (.5): precision 1/2 at recall 1
    assert aps[0] == pytest.approx(0.5)


def test_ap_from_pr_eleven_points_by_hand():
    recall = np.array([0.2, 0.4, 0.4, 0.8])
    precision = np.array([1.0, 0.8, 0.6, 0.5])
    # t = 0, .1, .2 -> 1; t = .3, .4 -> .8; t = .5 .. .8 -> .5; t = .9, 1 -> 0
    assert ap_from_pr(recall, precision) == pytest.approx((3 * 1 + 2 * 0.8 + 4 * 0.5) / 11)
    assert ap_from_pr(recall, precision, "area") == pytest.approx(0.2 * 1 + 0.2 * 0.8 + 0.4 * 0.5)
    with pytest.raises(ValueError, match="metric"):
        ap_from_pr(recall, precision, "coco")


# ----------------------------------------------------------------------------------------------
# mIoU
# ----------------------------------------------------------------------------------------------

def test_confusion_matrix_and_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = ConfusionMatrix(num_classes=3)
    cm.update(pred, target)
    # rows = truth, columns = prediction, the 255 pixel skipped
    expected = np.array([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    np.testing.assert_array_equal(cm.matrix.numpy(), expected)
    keep = target.flatten() != 255
    np.testing.assert_array_equal(
        expected, confusion_matrix(target.flatten()[keep], pred.flatten()[keep], labels=[0, 1, 2]))
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (3 + 3 - 2) = 1/2; class 2: 1 / (2 + 2 - 1) = 1/3
    np.testing.assert_allclose(cm.iou(), [1 / 3, 1 / 2, 1 / 3])
    assert cm.mean_iou() == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 7)


def test_absent_classes_are_left_out_of_the_mean_and_updates_accumulate():
    cm = ConfusionMatrix(num_classes=21)
    cm.update(torch.tensor([0, 0, 5]), torch.tensor([0, 5, 5]))
    cm.update(torch.tensor([5]), torch.tensor([255]))
    iou = cm.iou()
    assert iou[0] == pytest.approx(1 / 2) and iou[5] == pytest.approx(1 / 2)
    assert np.isnan(iou[1:5]).all() and np.isnan(iou[6:]).all()
    assert cm.mean_iou() == pytest.approx(0.5)
    np.testing.assert_allclose(iou_from_confusion(cm.matrix.numpy()), iou, equal_nan=True)


def test_labels_outside_the_palette_are_rejected():
    cm = ConfusionMatrix(num_classes=21)
    with pytest.raises(ValueError, match="0..20 or 255"):
        cm.update(torch.tensor([0]), torch.tensor([42]))
