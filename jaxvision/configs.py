"""Model configs and presets, shared by both frameworks.

Framework-free on purpose: `jaxvision.models` and `torch_reference.models` build the same network
from the same frozen dataclass, so a preset cannot drift between them. Presets live in plain
dicts and are picked with `--preset NAME`.
"""

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class CNNConfig:
    """The lab's CNN (seeds 001, 002, 004); see `jaxvision.models.cnn`."""

    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    conv1_features: int = 32
    conv2_features: int = 64
    hidden: int = 128
    dropout: float = 0.5

    @property
    def pooled_size(self) -> int:
        return self.image_size // 4  # two 2x2 max-pools, flooring an odd size like torch


# `lab`: the lab's network, 421,642 parameters; ~97% on the bundled sample in 10 epochs.
# `tiny`: for tests and smoke runs only.
CNN_PRESETS: dict[str, CNNConfig] = {
    "lab": CNNConfig(),
    "tiny": CNNConfig(conv1_features=4, conv2_features=8, hidden=16),
}


# Every arch the lab compared. The ones without presets are not built yet.
ARCH_PRESETS: dict[str, dict] = {"cnn": CNN_PRESETS}
PLANNED_ARCHS = ("vit", "vgg16", "alexnet", "faster_rcnn")
DEFAULT_PRESET = {"cnn": "lab"}


def check_arch(arch: str) -> None:
    from jaxvision.errors import UserError

    if arch in ARCH_PRESETS:
        return
    built = ", ".join(ARCH_PRESETS)
    planned = ", ".join(a for a in PLANNED_ARCHS if a not in ARCH_PRESETS)
    if arch in PLANNED_ARCHS:
        raise UserError(f"--arch {arch} is not built yet; available now: {built}")
    raise UserError(f"unknown --arch {arch!r}; available: {built} (planned: {planned})")


def get_config(arch: str, preset: str | None = None, **fields):
    """The preset's config for `arch`, with dataset fields (num_classes, ...) replaced."""
    from jaxvision.errors import UserError

    check_arch(arch)
    presets = ARCH_PRESETS[arch]
    preset = preset or DEFAULT_PRESET[arch]
    if preset not in presets:
        raise UserError(f"unknown --preset {preset!r} for {arch}; available: {', '.join(presets)}")
    return dataclasses.replace(presets[preset], **fields)
