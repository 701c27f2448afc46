"""Classification metrics in jax.numpy: accuracy, confusion matrix, macro F1.

They run on the device, inside or outside `jit`, and agree with scikit-learn's `accuracy_score`
and `f1_score(average='macro')`: the macro mean runs over the classes that occur in the labels or
the predictions, and a class with no true and no predicted positives scores F1 = 0 (scikit-learn's
`zero_division` default). `torch_reference.metrics` is the PyTorch twin.
"""

import jax
import jax.numpy as jnp


def confusion_matrix(labels: jax.Array, preds: jax.Array, num_classes: int) -> jax.Array:
    """(num_classes, num_classes) int32 counts, rows are true classes, columns predictions."""
    flat = labels.astype(jnp.int32) * num_classes + preds.astype(jnp.int32)  # (N,)
    counts = jnp.bincount(flat, length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)  # (K*K,) -> (K, K)


def accuracy(labels: jax.Array, preds: jax.Array) -> jax.Array:
    return jnp.mean((labels == preds).astype(jnp.float32))


def f1_macro(labels: jax.Array, preds: jax.Array, num_classes: int) -> jax.Array:
    cm = confusion_matrix(labels, preds, num_classes).astype(jnp.float32)
    tp = jnp.diag(cm)
    support = cm.sum(axis=1)  # true count per class
    predicted = cm.sum(axis=0)  # predicted count per class
    denom = support + predicted  # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted)
    f1 = jnp.where(denom > 0, 2.0 * tp / jnp.maximum(denom, 1.0), 0.0)
    present = denom > 0
    return jnp.sum(jnp.where(present, f1, 0.0)) / jnp.maximum(present.sum(), 1)
