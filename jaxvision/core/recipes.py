"""Training recipes: the optimisation settings an arch trains with unless a flag says otherwise.

Each arch owns its recipes in the registry (`jaxvision.core.archs.ARCHS`); `TrainConfig` takes
every field left unset from the recipe it names. The fields mean the same in both backends.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Recipe:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0  # AdamW only
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    clip_norm: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = False
    image_size: int | None = None  # None: the data's own size
    pretrained: bool = False
    unfreeze: bool = False
    feature_lr: float | None = None
    scan: bool = False  # JAX: --log-every steps per compiled call, under lax.scan
    eval_every: int = 1  # epochs between test-set evaluations (and always after the last)


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))
