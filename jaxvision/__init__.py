"""jaxvision: the MNIST computer-vision lab rebuilt in JAX/Flax NNX, with PyTorch twins.

Layers, each importing only those below it (an import-linter contract in pyproject.toml):
  apps      train, predict, export, benchmark, lab; the only place a backend is chosen
  interop   torch <-> Flax weight conversion, pretrained weights for Flax
  training  JAX training (trainer, augmentation, metrics, mesh, orbax checkpoints)
  models    Flax NNX models          (torch_reference: the PyTorch twins, on the same core)
  core      framework-free: configs, archs, recipes, data, the epoch loop, results, formats
Importing the package is cheap: `jaxvision.core` imports neither JAX nor torch.
"""

__version__ = "0.1.0"
