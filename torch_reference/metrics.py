"""Classification metrics in PyTorch, the twin of `jaxvision.training.metrics` (same
definitions)."""

import torch


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows are true classes, columns predictions."""
    flat = labels.long() * num_classes + preds.long()  # (N,)
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)  # (K*K,) -> (K, K)


def accuracy(labels: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
    return (labels == preds).float().mean()


def f1_macro(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    cm = confusion_matrix(labels, preds, num_classes).float()
    tp = torch.diag(cm)
    denom = cm.sum(dim=1) + cm.sum(dim=0)  # support + predicted = 2 TP + FP + FN
    f1 = torch.where(denom > 0, 2.0 * tp / denom.clamp(min=1.0), torch.zeros_like(denom))
    present = denom > 0
    return f1[present].sum() / present.sum().clamp(min=1)
