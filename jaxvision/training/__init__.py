"""JAX training: the trainer and its state pytree, on-device augmentation and metrics, the device
mesh, and orbax checkpoints. Imports `jaxvision.core` and `jaxvision.models`, never torch."""
