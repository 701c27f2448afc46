"""MNIST as a detection task, and reading a detector's output back as a class. Framework-free.

The lab repurposed Faster R-CNN as a digit classifier. Each digit becomes one object: a box
around its ink, labelled digit + 1 (label 0 is the detector's background). The detector is
`torch_reference.detection`; this module holds what does not depend on it:

- `ink_boxes`: the target box of every image at once, vectorised;
- `classify`: the class of each image from its detections, with the fallback when none is
  confident enough;
- `box_iou`, `average_precision`, `mean_average_precision`, `top_box_iou`: the detection figures.

Boxes are (x1, y1, x2, y2) in pixels, torchvision's convention: a box covering pixel columns
c0..c1 inclusive runs from x1 = c0 to x2 = c1 + 1.
"""

from __future__ import annotations

import numpy as np

from jaxvision.core.errors import DataError, UserError

BACKGROUND = 0  # the detector's label 0; digit d is label d + 1


def split_boxes(x_train: np.ndarray, x_test: np.ndarray, margin: int = 0):
    """`ink_boxes` of both splits: (train boxes, train has_ink, test boxes, test has_ink). A
    DataError when a split has no inked image: nothing to train on, or nothing to score."""
    boxes, ink = ink_boxes(x_train, margin)
    test_boxes, test_ink = ink_boxes(x_test, margin)
    for split, has_ink in (("training", ink), ("test", test_ink)):
        if not has_ink.any():
            raise DataError(f"every {split} image is blank (no ink, so no box for the detector); "
                            "check the data")  # fmt: skip
    return boxes, ink, test_boxes, test_ink


def ink_boxes(
    images: np.ndarray, margin: int = 0, threshold: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The tight box around each image's ink (pixels > `threshold`), grown by `margin` pixels.

    images: (N, H, W) or (N, H, W, C) uint8. Returns boxes (N, 4) float32 as (x1, y1, x2, y2),
    clipped to the image, and has_ink (N,) bool; a blank image's box is all zeros and it is
    flagged False, so that the caller skips it rather than hand torchvision an empty box.
    """
    images = np.asarray(images)
    if images.ndim == 4:
        images = images.max(axis=-1)  # ink in any channel
    if images.ndim != 3:
        raise UserError(f"ink_boxes needs (N, H, W[, C]) images, got shape {images.shape}")
    if margin < 0:
        raise UserError(f"--box-margin must be >= 0 pixels, got {margin}")
    n, h, w = images.shape
    ink = images > threshold
    rows, cols = ink.any(axis=2), ink.any(axis=1)  # (N, H), (N, W)
    has_ink = rows.any(axis=1)
    y1 = rows.argmax(axis=1)
    y2 = h - rows[:, ::-1].argmax(axis=1)  # one past the last inked row
    x1 = cols.argmax(axis=1)
    x2 = w - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x1 - margin, y1 - margin, x2 + margin, y2 + margin], axis=1)
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    boxes[~has_ink] = 0.0
    return boxes, has_ink


def classify(
    det_scores: list[np.ndarray],
    det_labels: list[np.ndarray],
    class_scores: np.ndarray,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's digit: the label of its highest-scoring detection with score >= threshold.

    det_scores, det_labels: per image, the detector's detections (labels are digit + 1).
    class_scores: (N, K + 1), per image the box head's best softmax score of each class over all
    its proposals (column 0 is background). An image without a confident detection falls back to
    the best foreground column. Returns predicted digits (N,) and a mask of the fallbacks (N,).
    """
    n = len(det_scores)
    preds = np.empty(n, dtype=np.int64)
    fallback = np.zeros(n, dtype=bool)
    for i, (scores, labels) in enumerate(zip(det_scores, det_labels, strict=True)):
        scores, labels = np.asarray(scores), np.asarray(labels)
        keep = (scores >= threshold) & (labels != BACKGROUND)
        if keep.any():
            preds[i] = labels[keep][np.argmax(scores[keep])] - 1
        else:
            fallback[i] = True
            preds[i] = int(np.argmax(class_scores[i, 1:]))
    return preds, fallback


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union of (n, 4) and (m, 4) boxes -> (n, m)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (n, m, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def average_precision(scores: np.ndarray, is_tp: np.ndarray, n_positives: int) -> float:
    """Area under the precision-recall curve of one class (all-point interpolation, as in
    PASCAL VOC 2010+): precision made monotone from the right, integrated over recall.

    scores, is_tp: every detection of the class over the whole split, and whether it matched a
    target. n_positives: the number of targets of the class.
    """
    if n_positives == 0:
        raise ValueError("average precision is undefined for a class with no targets")
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.asarray(is_tp, bool)[order]
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(~tp)
    recall = np.concatenate([[0.0], tp_cum / n_positives, [1.0]])
    precision = np.concatenate([[1.0], tp_cum / np.maximum(tp_cum + fp_cum, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def mean_average_precision(
    detections: list[dict], targets: list[dict], iou_threshold: float = 0.5
) -> float:
    """mAP at `iou_threshold` over the classes present in `targets` (VOC-style matching).

    detections: per image {"boxes" (d, 4), "scores" (d,), "labels" (d,)}; targets: per image
    {"boxes" (t, 4), "labels" (t,)}. Per class, detections are taken in descending score over the
    whole split; each is a true positive if its best-overlapping same-class target, not already
    matched, has IoU >= iou_threshold. Everything else is a false positive.
    """
    classes = np.unique(np.concatenate([np.asarray(t["labels"]) for t in targets]))
    aps = []
    for c in classes:
        scores, is_tp, n_pos = [], [], 0
        for det, tgt in zip(detections, targets, strict=True):
            gt = np.asarray(tgt["boxes"]).reshape(-1, 4)[np.asarray(tgt["labels"]) == c]
            n_pos += len(gt)
            mask = np.asarray(det["labels"]) == c
            boxes = np.asarray(det["boxes"]).reshape(-1, 4)[mask]
            s = np.asarray(det["scores"])[mask]
            matched = np.zeros(len(gt), bool)
            for j in np.argsort(-s, kind="stable"):
                hit = False
                if len(gt):
                    ious = box_iou(boxes[j], gt)[0]
                    ious[matched] = -1.0
                    k = int(np.argmax(ious))
                    if ious[k] >= iou_threshold:
                        matched[k], hit = True, True
                scores.append(s[j])
                is_tp.append(hit)
        aps.append(average_precision(np.array(scores), np.array(is_tp, bool), n_pos))
    return float(np.mean(aps))


def top_box_iou(detections: list[dict], target_boxes: np.ndarray) -> np.ndarray:
    """Per image, the IoU of its highest-scoring detection (any class) with its target box;
    0 for an image with no detection."""
    out = np.zeros(len(detections))
    for i, det in enumerate(detections):
        scores = np.asarray(det["scores"])
        if len(scores):
            top = np.asarray(det["boxes"]).reshape(-1, 4)[np.argmax(scores)]
            out[i] = box_iou(top, target_boxes[i])[0, 0]
    return out


def readout(
    detections: list[dict],
    class_scores: np.ndarray,
    labels: np.ndarray,
    target_boxes: np.ndarray,
    has_ink: np.ndarray,
    threshold: float,
) -> tuple[np.ndarray, dict]:
    """A split's predicted digits and detection figures, from a detector's output: both
    backends' evaluations end here.

    detections: per image {"boxes", "scores", "labels"} in input pixels (labels digit + 1);
    class_scores (N, K + 1) as `classify` takes them; labels (N,) digits; target_boxes (N, 4) and
    has_ink (N,) from `ink_boxes`. Blank images are classified but left out of mAP@0.5 and the
    top-box IoU. Returns the predictions (N,) and {"map50", "mean_iou", "fallbacks"}.
    """
    preds, fallback = classify(
        [d["scores"] for d in detections],
        [d["labels"] for d in detections],
        class_scores,
        threshold,
    )
    inked = np.flatnonzero(has_ink)
    targets = [{"boxes": target_boxes[i : i + 1], "labels": labels[i : i + 1] + 1} for i in inked]
    dets = [detections[i] for i in inked]
    return preds, {
        "map50": mean_average_precision(dets, targets, 0.5) if dets else 0.0,
        "mean_iou": float(top_box_iou(dets, target_boxes[inked]).mean()) if dets else 0.0,
        "fallbacks": int(fallback.sum()),
    }


def run_extras(config, model_cfg, final: dict, n_test: int, skipped_train: int,
               blank_test: int) -> dict:  # fmt: skip
    """A detector run's `RunResult.extras`: its settings and last evaluation's figures."""
    return {
        "detector": model_cfg.detector,
        "image_size": model_cfg.image_size,
        "box_margin": config.box_margin,
        "score_threshold": config.score_threshold,
        "map50": final["map50"],
        "mean_iou": final["mean_iou"],
        "fallbacks": final["fallbacks"],
        "fallback_fraction": final["fallbacks"] / n_test,
        "blank_train_skipped": skipped_train,
        "blank_test_excluded": blank_test,
        "loss": "sum of torchvision's RPN objectness, RPN box, box-head classification and box "
        "regression losses; test loss with BatchNorm in eval mode",
    }
