"""Attention maps for a trained ViT: attention rollout, drawn as a PNG grid.

Attention rollout (Abnar & Zuidema 2020): average each layer's attention over heads, add the
identity for the residual path, renormalise the rows, and multiply the layers together. Row 0 of
the product is how much the [CLS] token draws from each patch through the whole network. For a
mean-pooled ViT (no [CLS] token) the rows are averaged instead. Framework-free: both backends hand
over their attention weights as numpy arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxvision.core.errors import writing


def attention_rollout(attns: list[np.ndarray]) -> np.ndarray:
    """attns: per layer (B, heads, T, T) -> (B, T, T), rows summing to 1."""
    rollout = None
    for a in attns:
        a = a.mean(axis=1)  # (B, T, T): average over heads
        a = a + np.eye(a.shape[-1])[None]  # the residual connection
        a = a / a.sum(axis=-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def patch_map(rollout: np.ndarray, grid: int, has_cls: bool) -> np.ndarray:
    """(B, T, T) rollout -> (B, grid, grid): what the classifier reads from each patch."""
    if has_cls:
        weights = rollout[:, 0, 1:]  # (B, N): the [CLS] row, patch columns
    else:
        weights = rollout.mean(axis=1)  # (B, N): the mean-pooled tokens' rows
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights.reshape(-1, grid, grid)  # (B, N) -> (B, grid, grid)


def save_attention_grid(
    images: np.ndarray, maps: np.ndarray, labels, preds, path: Path, title: str
) -> Path:
    """Digits (B, H, W) on the top row, their maps overlaid on the bottom row; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, h, w = images.shape
    fig, axes = plt.subplots(2, b, figsize=(1.6 * b, 3.6), squeeze=False)
    for i in range(b):
        axes[0, i].imshow(images[i], cmap="gray")
        axes[0, i].set_title(
            f"label {labels[i]}\npred {preds[i]}",
            fontsize=8,
            color="black" if labels[i] == preds[i] else "red",
        )
        axes[1, i].imshow(images[i], cmap="gray")
        axes[1, i].imshow(
            maps[i],
            cmap="inferno",
            alpha=0.6,
            extent=(-0.5, w - 0.5, h - 0.5, -0.5),
            interpolation="nearest",
        )
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("rollout", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
