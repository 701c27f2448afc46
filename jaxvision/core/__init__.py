"""The framework-free core: what both backends and the apps share. Imports neither JAX nor torch
(a test checks it in a fresh interpreter): errors, model configs and presets, the arch registry
and its recipes, `TrainConfig` and its flags, data loading, the epoch loop, results and reports,
the checkpoint format, detection targets and metrics, preprocessing constants."""
