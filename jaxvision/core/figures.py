"""What a person looks at after a run: the confusion matrix and the most confident mistakes, as
PNGs. Framework-free: both backends hand over labels, predictions and probabilities as numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxvision.core.errors import writing


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows the true classes, columns the predictions."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(preds, np.int64)  # (N,)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def worst_mistakes(labels: np.ndarray, preds: np.ndarray, confidence: np.ndarray,
                   n: int = 32) -> np.ndarray:  # fmt: skip
    """Indices of the (up to) `n` misclassified images whose predicted class has the highest
    probability, most confident first. preds, confidence: (N,), each image's predicted class
    and that class's probability."""
    wrong = np.flatnonzero(np.asarray(preds) != labels)
    return wrong[np.argsort(-np.asarray(confidence)[wrong], kind="stable")[:n]]


def _pyplot():
    import matplotlib  # lazy: heavy, and only drawing needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_confusion(cm: np.ndarray, classes, path: Path, title: str) -> Path:
    """confusion.png: counts in every cell, shaded by each row's share (per-class recall)."""
    plt = _pyplot()
    k = len(cm)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * k, 0.8 + 0.55 * k))
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]:,}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(k), classes, fontsize=8, rotation=90 if max(map(len, classes)) > 2 else 0)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"{title}\naccuracy {accuracy:.2%} on {cm.sum():,} test images", fontsize=9)
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _tile(image) -> np.ndarray:
    """One image as (H, W, 3) floats in [0, 1]: grey scaled to its own range (as imshow shows
    it), colour as stored (uint8 / 255; an alpha channel dropped)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        rgb = image[..., :3]
        return rgb / 255.0 if image.dtype == np.uint8 else np.clip(rgb, 0.0, 1.0)
    grey = image.reshape(image.shape[:2]).astype(np.float32)
    low, high = grey.min(), grey.max()
    grey = (grey - low) / (high - low) if high > low else np.zeros_like(grey)
    return np.repeat(grey[..., None], 3, -1)


def save_mistakes(images, labels, preds, confidence, index, classes, path: Path,
                  title: str) -> Path:  # fmt: skip
    """mistakes.png: the images `index` (from `worst_mistakes`), each titled with its true
    label, the predicted one `preds` and that prediction's probability `confidence`.
    images: (N, H, W[, C]).

    Drawn as one mosaic with its captions in a single axes: an axes per image (and
    tight_layout over 32 of them) took a second more of every run."""
    plt = _pyplot()
    cols = 8
    rows = max(1, -(-len(index) // cols))
    h, w = np.shape(images)[1:3]
    gap, top = max(h // 6, 2), max(h // 2, 8)  # between tiles; above each, for its caption
    cell_h, cell_w = top + h + gap, w + gap
    mosaic = np.ones((rows * cell_h, cols * cell_w - gap, 3), np.float32)  # white
    width = 1.5 * cols  # inches; the height keeps the tiles square, with room for the title
    height = width * mosaic.shape[0] / mosaic.shape[1]
    fig = plt.figure(figsize=(width, height + 0.45))
    ax = fig.add_axes((0.0, 0.0, 1.0, height / (height + 0.45)))
    for n, i in enumerate(index):
        r, c = divmod(n, cols)
        y, x = r * cell_h + top, c * cell_w
        mosaic[y : y + h, x : x + w] = _tile(images[i])
        caption = f"true {classes[labels[i]]}\npred {classes[preds[i]]} {confidence[i]:.0%}"
        ax.text(x + w / 2, y - 1, caption, ha="center", va="bottom", fontsize=7, color="red")
    ax.imshow(mosaic)  # matplotlib's default: nearest where tiles are enlarged, smoothed shrunk
    ax.axis("off")
    if len(index) == 0:
        ax.text(0.5, 0.5, "no mistakes", fontsize=10, transform=ax.transAxes)
    fig.suptitle(f"{title}: the {len(index)} most confident mistakes", fontsize=9)
    with writing(path):
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
