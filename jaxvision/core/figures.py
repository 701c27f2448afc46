"""What a person looks at after a run: the confusion matrix and the most confident mistakes, as
PNGs. Framework-free: both backends hand over labels, predictions and probabilities as numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows the true classes, columns the predictions."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(preds, np.int64)  # (N,)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def worst_mistakes(labels: np.ndarray, probs: np.ndarray, n: int = 32) -> np.ndarray:
    """Indices of the (up to) `n` misclassified images whose predicted class has the highest
    probability, most confident first. probs: (N, K)."""
    preds = probs.argmax(-1)
    wrong = np.flatnonzero(preds != labels)
    confidence = probs[wrong, preds[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:n]]


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_mistakes(images, labels, probs, index, classes, path: Path, title: str) -> Path:
    """mistakes.png: the images `index` (from `worst_mistakes`), each titled with its true
    label, the predicted one and that prediction's probability. images: (N, H, W[, 1])."""
    plt = _pyplot()
    cols = 8
    rows = max(1, -(-len(index) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.75 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), index, strict=False):
        pred = int(probs[i].argmax())
        ax.imshow(np.asarray(images[i]).squeeze(), cmap="gray")
        ax.set_title(f"true {classes[labels[i]]}\npred {classes[pred]} {probs[i, pred]:.0%}",
                     fontsize=7, color="red")  # fmt: skip
    if len(index) == 0:
        axes[0, 0].text(0, 0.5, "no mistakes", fontsize=10)
    fig.suptitle(f"{title}: the {len(index)} most confident mistakes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
