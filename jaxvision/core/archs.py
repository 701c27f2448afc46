"""The arch registry: each of the lab's models registered once, with everything both frameworks
and the apps need to know about it.

An `Arch` names its model config class and presets, its training recipes (`"default"` and the
lab's named ones), where its Flax and torch models are built, its torch <-> Flax conversion table
and torchvision's pretrained weights. Code elsewhere reads these facts from here; adding an arch
is one entry in `ARCHS` (and its model files).

Builders are given as "module:attribute" strings and imported only when asked for
(`Arch.load`), so that this framework-free table can name Flax and torch code without importing
either: the torch backend never loads JAX, nor the JAX backend torch. `None` says an arch has no
such entry (the CNN and the ViT have no pretrained weights).
A test checks that every entry resolves.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from jaxvision.core.errors import UserError
from jaxvision.core.model_configs import (
    ALEXNET_PRESETS,
    CNN_PRESETS,
    DETECTORS,
    FASTER_RCNN_PRESETS,
    VGG_PRESETS,
    VIT_PRESETS,
    AlexNetConfig,
    CNNConfig,
    FasterRCNNConfig,
    VGGConfig,
    ViTConfig,
)
from jaxvision.core.recipes import Recipe

DEFAULT_RECIPE = "default"


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    config: type  # the model config dataclass (jaxvision.core.model_configs)
    presets: Mapping[str, Any]  # --preset NAME -> config
    default_preset: str
    recipes: Mapping[str, Recipe]  # --recipe NAME -> training recipe; "default" is the default
    flax_model: str | None  # "module:attr", called as attr(config, rngs=...); None: no Flax twin
    torch_model: str  # "module:attr", called as attr(config)
    conversion: str | None  # "module:attr", attr(config) -> the torch <-> Flax key table
    pretrained: Mapping[str, str] | None  # preset -> torchvision's weights enum entry
    imagenet: bool = False  # inputs resized to --image-size, grey -> RGB, ImageNet statistics
    detector: bool = False  # trained as a detector, read out as a classifier
    attention: bool = False  # has attention maps to draw (--save-attention)
    # JAX on a CPU host: train data-parallel over one CPU device per core rather than on one
    # device with XLA's intra-op threads. Measured faster for the small models (CNN, ViT) and
    # 5-10x slower for the large ones, whose split programs lose the threads of their big
    # convolutions and matmuls (docs/performance.md; `jaxvision.apps.jax_backend`).
    cpu_split: bool = False
    # JAX on a CPU host: YNNPACK for XLA's matmul fusions (`jaxvision.apps.jax_backend.YNN_DOT`).
    # Measured faster for every classifier (CNN 1.6x, AlexNet 1.3x); the detector trains and
    # detects about 1.4x faster without it, and compiles in about 25 s rather than 36
    # (docs/performance.md).
    cpu_ynn: bool = True
    only_torch_because: str = ""  # why there is no Flax model, for the error message
    summary: str = ""

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends that can train this arch: the frameworks it has a model in."""
        return tuple(b for b, m in (("jax", self.flax_model), ("torch", self.torch_model)) if m)

    def recipe(self, name: str = DEFAULT_RECIPE) -> Recipe:
        if name not in self.recipes:
            raise UserError(f"unknown --recipe {name!r} for {self.name}; available: "
                            f"{', '.join(self.recipes)}")  # fmt: skip
        return self.recipes[name]

    def preset(self, name: str | None = None):
        name = name or self.default_preset
        if name not in self.presets:
            raise UserError(
                f"unknown --preset {name!r} for {self.name}; available: {', '.join(self.presets)}"
            )
        return self.presets[name]

    def weights_name(self, preset: str | None = None) -> str:
        """How pretrained weights are named in messages and caches: the arch, or (one set per
        preset, as for Faster R-CNN's detectors) 'arch/preset'."""
        if self.pretrained is not None and len(self.pretrained) > 1:
            return f"{self.name}/{preset or self.default_preset}"
        return self.name

    def weights_entry(self, preset: str | None = None) -> str | None:
        """torchvision's weights enum entry for `preset`, or None when there are none."""
        if self.pretrained is None:
            return None
        if len(self.pretrained) == 1:
            return next(iter(self.pretrained.values()))
        return self.pretrained.get(preset or self.default_preset)

    def load(self, entry: str) -> Any:
        """The object a "module:attr" entry names (`flax_model`, `torch_model`, `conversion`)."""
        ref = getattr(self, entry)
        if ref is None:
            raise UserError(f"{self.name} has no {entry.replace('_', ' ')}")
        return load_ref(ref)


def load_ref(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


_LAB_CNN = Recipe(epochs=10, batch_size=128, lr=1e-3)  # the lab's: constant-lr Adam
# The same network, trained for 5,000 digits: on-device augmentation, AdamW, warmup + cosine,
# label smoothing. On MNIST's official test set it lifts the lab's 97.4% past 99% (README).
_CNN = Recipe(epochs=40, batch_size=64, lr=3e-3, optimizer="adamw", weight_decay=0.05,
              schedule="cosine", warmup_epochs=1.0, label_smoothing=0.1, augment=True,
              eval_every=5)  # fmt: skip
# Fine-tuning is scored after its last epoch only (eval_every >= every variant's epochs): one
# pass over 10,000 test images costs VGG16 minutes on a CPU.
_FINE_TUNE = Recipe(epochs=3, batch_size=64, lr=1e-3, image_size=224, pretrained=True,
                    feature_lr=1e-4, eval_every=3)  # fmt: skip
_VIT = Recipe(epochs=150, batch_size=128, lr=3e-3, optimizer="adamw", weight_decay=0.05,
              schedule="cosine", warmup_epochs=3.0, clip_norm=1.0, label_smoothing=0.1,
              augment=True, scan=True, eval_every=10)  # fmt: skip
# Evaluated after the last epoch only: the detector takes about 5 minutes over 10,000 test images.
_FASTER_RCNN = Recipe(epochs=3, batch_size=8, lr=0.01, optimizer="sgd", schedule="cosine",
                      warmup_epochs=0.25, clip_norm=10.0, image_size=64, pretrained=True,
                      feature_lr=1e-3, eval_every=3)  # fmt: skip

# Recipes: "default" is what `train.py --arch A` runs. "lab-cpu" is the lab's model sized for
# a 2-core CPU and no network (random weights), which `scripts/run_lab.py` runs; "lab-pretrained"
# is the lab's fine-tuning from torchvision's weights, one epoch (`run_lab.py --pretrained`).
ARCHS: dict[str, Arch] = {
    "cnn": Arch(
        "cnn",
        CNNConfig,
        CNN_PRESETS,
        "lab",
        {"default": _CNN, "lab-cpu": _LAB_CNN, "lab-pretrained": _LAB_CNN},
        flax_model="jaxvision.models.cnn:CNN",
        torch_model="torch_reference.models.cnn:CNN",
        conversion="jaxvision.interop.convert:cnn_rules",
        pretrained=None,
        summary="the lab's small CNN",
        cpu_split=True,
    ),
    "vit": Arch(
        "vit",
        ViTConfig,
        VIT_PRESETS,
        "tiny",
        # What a from-scratch transformer needs: AdamW, warmup + cosine, clipping, label
        # smoothing, augmentation. Trained `log_every` steps per compiled call (scan): on CPU its
        # small matmuls leave per-step dispatch a large share (docs/performance.md).
        {"default": _VIT, "lab-cpu": dataclasses.replace(_VIT, epochs=30), "lab-pretrained": _VIT},
        flax_model="jaxvision.models.vit:ViT",
        torch_model="torch_reference.models.vit:ViT",
        conversion="jaxvision.interop.convert:vit_rules",
        pretrained=None,
        attention=True,
        summary="a Vision Transformer from scratch",
        cpu_split=True,
    ),
    "vgg16": Arch(
        "vgg16",
        VGGConfig,
        VGG_PRESETS,
        "vgg16",
        # The lab's fine-tuning: ImageNet weights, features frozen, a new 10-way head.
        {
            "default": _FINE_TUNE,
            "lab-cpu": dataclasses.replace(
                _FINE_TUNE, epochs=2, lr=1e-4, image_size=32, pretrained=False, unfreeze=True
            ),  # fmt: skip
            "lab-pretrained": dataclasses.replace(_FINE_TUNE, epochs=1),
        },
        flax_model="jaxvision.models.vgg:VGG",
        torch_model="torch_reference.models.vgg:VGG",
        conversion="jaxvision.interop.convert:vgg_rules",
        pretrained={"vgg16": "VGG16_Weights.IMAGENET1K_V1"},
        imagenet=True,
        summary="VGG16, fine-tuned from ImageNet",
    ),
    "alexnet": Arch(
        "alexnet",
        AlexNetConfig,
        ALEXNET_PRESETS,
        "alexnet",
        {
            "default": _FINE_TUNE,
            "lab-cpu": dataclasses.replace(
                _FINE_TUNE, image_size=64, pretrained=False, unfreeze=True
            ),  # fmt: skip
            "lab-pretrained": dataclasses.replace(_FINE_TUNE, epochs=1),
        },
        flax_model="jaxvision.models.alexnet:AlexNet",
        torch_model="torch_reference.models.alexnet:AlexNet",
        conversion="jaxvision.interop.convert:alexnet_rules",
        pretrained={"alexnet": "AlexNet_Weights.IMAGENET1K_V1"},
        imagenet=True,
        summary="AlexNet, fine-tuned from ImageNet",
    ),
    "faster_rcnn": Arch(
        "faster_rcnn",
        FasterRCNNConfig,
        FASTER_RCNN_PRESETS,
        "mobilenet_v3_320",
        # torchvision's recipe (SGD, momentum 0.9, warmup) at a CPU-sized batch; the transform
        # resizes each 28x28 digit to 64x64 (`FasterRCNNConfig.image_size`).
        {
            "default": _FASTER_RCNN,
            "lab-cpu": dataclasses.replace(_FASTER_RCNN, epochs=1, pretrained=False),
            "lab-pretrained": dataclasses.replace(_FASTER_RCNN, epochs=1),
        },
        flax_model="jaxvision.models.detector:FasterRCNN",
        torch_model="torch_reference.models.detector:build_detector",
        conversion="jaxvision.interop.convert:faster_rcnn_rules",
        pretrained={
            "mobilenet_v3_320": "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1",
            "resnet50_fpn": "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
        },
        detector=True,
        summary=f"Faster R-CNN ({', '.join(DETECTORS.values())}) as a classifier",
        cpu_ynn=False,
    ),
}


def get_arch(arch: str) -> Arch:
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}; available: {', '.join(ARCHS)}")
    return ARCHS[arch]


def arch_of(config) -> Arch:
    """The arch whose model config class `config` is an instance of."""
    for a in ARCHS.values():
        if isinstance(config, a.config):
            return a
    raise TypeError(f"no arch is registered for {type(config).__name__}")


def get_config(arch: str, preset: str | None = None, **fields):
    """The preset's model config for `arch`, with dataset fields (num_classes, ...) replaced."""
    return dataclasses.replace(get_arch(arch).preset(preset), **fields)


def config_from_dict(arch: str, fields: dict):
    """A model config from its `dataclasses.asdict` form (a checkpoint's JSON meta)."""
    cls = get_arch(arch).config
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def model_config(arch: str, preset: str | None, num_classes: int, image_shape, image_size):
    """The model's config for a run: the preset, sized for the data (H, W, C), or for
    `image_size` where the arch resizes its inputs (ImageNet archs, the detector)."""
    a = get_arch(arch)
    h, w, c = image_shape
    if a.imagenet or a.detector:  # 3-channel input at --image-size; the head is replaced
        return get_config(arch, preset, num_classes=num_classes, image_size=image_size)
    if h != w:
        resizing = ", ".join(n for n, b in ARCHS.items() if b.imagenet or b.detector)
        raise UserError(
            f"--arch {arch} trains on square images, and these are {h}x{w}; crop or pad them, "
            f"or use an arch that resizes its input ({resizing})"
        )
    return get_config(arch, preset, num_classes=num_classes, in_channels=c, image_size=h)
