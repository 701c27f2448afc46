"""Framework-free position encodings, shared by the Flax and torch ViTs."""

import numpy as np


def sinusoidal_encoding(n: int, dim: int) -> np.ndarray:
    """(n, dim) float32: PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(same).

    Vaswani et al. 2017, section 3.5; position 0 is the [CLS] token when there is one.
    """
    pos = np.arange(n, dtype=np.float64)[:, None]  # (n, 1)
    i = np.arange(0, dim, 2, dtype=np.float64)[None, :]  # (1, ceil(dim/2))
    angle = pos / 10000.0 ** (i / dim)  # (n, ceil(dim/2))
    pe = np.zeros((n, dim))
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : dim // 2])
    return pe.astype(np.float32)
