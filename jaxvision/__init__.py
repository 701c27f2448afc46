"""jaxvision: the MNIST computer-vision lab rebuilt in JAX/Flax NNX, with PyTorch twins.

Importing the package is cheap; the heavy modules (`jaxvision.models`, `jaxvision.train`) import
JAX and Flax when they are used.
"""

__version__ = "0.1.0"
