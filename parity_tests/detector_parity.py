"""Comparing the Flax detector's outputs with torchvision's: per-stage bounds, and box lists
compared up to the order of tied scores. Shared by test_detector_flax.py (stage by stage) and
test_detection.py (a trained checkpoint, exported)."""

from typing import NamedTuple

import numpy as np


class Bounds(NamedTuple):
    """How far the Flax detector may be from torchvision's at each kind of stage."""

    rel: float  # values: max abs difference over the stage's largest |value|
    score: float  # probabilities (proposal and detection scores, class scores): max abs
    box: float  # box coordinates, px: max abs


# Measured on this project's machines (README): 64 px, float32: 1.5e-6 rel, 6e-8 score, 7.6e-6 px;
# 320 px: 1.5e-6, 6e-8, 4.5e-4 px (a box is decoded through exp, and 320 px is 5x the scale);
# ResNet-50 in float64: 5.7e-15, 8.7e-13, 8.6e-11 px.
FLOAT32_64PX, FLOAT32_320PX = Bounds(1e-5, 1e-6, 1e-4), Bounds(1e-5, 1e-6, 1e-3)
FLOAT64_64PX = Bounds(1e-13, 1e-11, 1e-9)


def close(stage: str, got, want, atol: float) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{stage}: shape {got.shape} != torchvision's {want.shape}"
    err = float(np.abs(got - want).max()) if got.size else 0.0
    print(f"{stage}: max abs difference {err:.2g}")  # the README's table: pytest -s
    assert err <= atol, f"{stage}: max abs difference {err:.3g} > {atol:g}"


def close_to_scale(stage: str, got, want, rel: float) -> None:
    """`close`, within `rel` of the largest |value| torchvision's stage holds."""
    want = np.asarray(want)
    scale = float(np.abs(want).max())
    assert scale > 0, f"{stage}: torchvision's stage is all zeros, which would prove nothing"
    close(f"{stage} (of {scale:.3g})", got, want, rel * scale)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def same_up_to_ties(stage, boxes, scores, want_boxes, want_scores, bounds: Bounds, labels=None,
                    want_labels=None, nms=None):  # fmt: skip
    """Two score-sorted lists hold the same boxes (within `bounds.box` px) with the same scores
    (`bounds.score`), in the same order wherever no scores tie: a box out of place must match
    one whose score is tied (within 1e-6) with its own. Labels, when given, must match box for box.

    With `nms` (threshold, torchvision's candidate boxes before NMS, their scores), the lists
    came out of NMS at that IoU, and a tie can also have been broken the other way before it: of
    two boxes whose scores are tied and that overlap by more than the threshold, NMS keeps
    whichever ranks first, so each framework may keep a different one. Such a pair is accepted
    at the same position, at most twice per list, when both scores are tied, both boxes overlap
    by more than the threshold, and torchvision had the Flax box among its own candidates with
    that score (so the box is right, and only the tie went the other way). Returns how many such
    pairs there were."""
    boxes, scores, want_boxes, want_scores = map(
        np.asarray, (boxes, scores, want_boxes, want_scores)
    )
    close(f"{stage}.scores", scores, want_scores, bounds.score)
    err, swapped, resolved, used = 0.0, 0, 0, set()
    for j in range(len(want_boxes)):
        tied = np.flatnonzero(np.abs(want_scores - want_scores[j]) <= 1e-6)
        candidates = [t for t in [j, *tied] if t not in used]  # each box matches once
        diffs = [np.abs(boxes[t] - want_boxes[j]).max() for t in candidates] or [np.inf]
        if min(diffs) > bounds.box and nms is not None and j not in used and resolved < 2:
            threshold, their_boxes, their_scores = nms
            theirs = (np.abs(their_boxes - boxes[j]).max(1) <= bounds.box) & (
                np.abs(their_scores - scores[j]) <= 1e-6
            )
            if (
                abs(scores[j] - want_scores[j]) <= 1e-6
                and iou(boxes[j], want_boxes[j]) > threshold
                and theirs.any()
            ):
                used.add(j)
                resolved += 1
                continue
        assert min(diffs) <= bounds.box, (
            f"{stage}[{j}]: no box within {bounds.box} px of torchvision's"
        )
        t = candidates[int(np.argmin(diffs))]
        used.add(t)
        if labels is not None:
            assert labels[t] == want_labels[j], (
                f"{stage}[{j}]: label {labels[t]} != {want_labels[j]}"
            )
        err, swapped = max(err, min(diffs)), swapped + (t != j)
    print(
        f"{stage}.boxes: max abs difference {err:.2g}; {swapped} tied pairs in another order"
        + (f"; {resolved} tied pairs that NMS resolved the other way" if resolved else "")
    )
    return resolved
