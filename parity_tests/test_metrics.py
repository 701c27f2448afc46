"""The JAX and torch metrics agree with scikit-learn's, on the same predictions."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from jaxvision.training import metrics as jm
from torch_reference import metrics as tm

rng = np.random.default_rng(0)
CASES = {
    "random": (rng.integers(0, 10, 1000), rng.integers(0, 10, 1000)),
    "mostly_right": (
        np.arange(1000) % 10,
        np.where(rng.random(1000) < 0.95, np.arange(1000) % 10, rng.integers(0, 10, 1000)),
    ),
    # class 9 never occurs, class 8 is never predicted, class 7 only predicted: sklearn averages
    # over the classes present in either array and scores an unpredicted class 0.
    "absent_classes": (np.array([0, 1, 2, 8, 8, 3, 3, 4]), np.array([0, 1, 2, 7, 1, 3, 4, 4])),
    "perfect": (np.arange(50) % 10, np.arange(50) % 10),
}


@pytest.mark.parametrize("case", CASES)
def test_metrics_match_sklearn_in_both_frameworks(case):
    y, p = CASES[case]
    want_acc = accuracy_score(y, p)
    want_f1 = f1_score(y, p, average="macro", zero_division=0)
    want_cm = confusion_matrix(y, p, labels=range(10))

    jy, jp = jnp.asarray(y), jnp.asarray(p)
    assert float(jm.accuracy(jy, jp)) == pytest.approx(want_acc, abs=1e-7)
    assert float(jm.f1_macro(jy, jp, 10)) == pytest.approx(want_f1, abs=1e-6)
    np.testing.assert_array_equal(np.asarray(jm.confusion_matrix(jy, jp, 10)), want_cm)

    ty, tp = torch.from_numpy(y), torch.from_numpy(p)
    assert tm.accuracy(ty, tp).item() == pytest.approx(want_acc, abs=1e-7)
    assert tm.f1_macro(ty, tp, 10).item() == pytest.approx(want_f1, abs=1e-6)
    np.testing.assert_array_equal(tm.confusion_matrix(ty, tp, 10).numpy(), want_cm)
