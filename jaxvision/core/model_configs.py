"""Model configs and presets, shared by both frameworks.

Framework-free on purpose: `jaxvision.models` and `torch_reference.models` build the same network
from the same frozen dataclass, so a preset cannot drift between them. Presets live in plain
dicts and are picked with `--preset NAME`; `jaxvision.core.archs` registers them per arch.
"""

import dataclasses

from jaxvision.core.errors import UserError


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

    def __post_init__(self):
        if self.image_size < 4:  # two 2x2 max-pools leave at least 1x1
            raise UserError(f"cnn needs images of at least 4x4 (it max-pools twice by 2), got "
                            f"{self.image_size}x{self.image_size}")  # fmt: skip

    @property
    def pooled_size(self) -> int:
        return self.image_size // 4  # two 2x2 max-pools, flooring an odd size like torch


# `lab`: the lab's network, 421,642 parameters; ~97% on the bundled sample in 10 epochs.
# `tiny`: for tests and smoke runs only.
CNN_PRESETS: dict[str, CNNConfig] = {
    "lab": CNNConfig(),
    "tiny": CNNConfig(conv1_features=4, conv2_features=8, hidden=16),
}


@dataclasses.dataclass(frozen=True, slots=True)
class ViTConfig:
    """A Vision Transformer (Dosovitskiy et al. 2020); see `jaxvision.models.vit`."""

    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    patch_size: int = 4
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0
    attn_dropout: float = 0.0
    pos_encoding: str = "learned"  # learned | sinusoidal
    pool: str = "cls"  # cls: a [CLS] token is prepended and classified; mean: mean of patch tokens
    # Pinned in both frameworks: torch's LayerNorm defaults to 1e-5 and Flax's to 1e-6.
    ln_eps: float = 1e-6

    def __post_init__(self):
        if self.image_size % self.patch_size:
            fits = [n for n, c in VIT_PRESETS.items() if self.image_size % c.patch_size == 0]
            raise UserError(
                f"ViT patch size {self.patch_size} does not divide the image size "
                f"{self.image_size}; "
                + (f"use --preset {' or '.join(fits)}" if fits else "no preset's patch size does")
            )
        if self.dim % self.heads:
            raise UserError(f"ViT dim {self.dim} is not divisible by heads {self.heads}")
        if self.pos_encoding not in ("learned", "sinusoidal"):
            raise UserError(
                f"ViT pos_encoding must be learned or sinusoidal, not {self.pos_encoding!r}"
            )
        if self.pool not in ("cls", "mean"):
            raise UserError(f"ViT pool must be cls or mean, not {self.pool!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size  # patches per side

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (self.pool == "cls")

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_channels


# `lab`: the lab's small ViT: a 7x7 grid of 4x4-pixel patches (49 patches + [CLS], seeds 002 and
#   003), 2 blocks, 2 heads, sinusoidal positions, and dim 8 as in the tutorial seed 004 follows.
#   1,994 parameters; seed 002's "~10k" was a rough figure.
# `tiny`: the CLI default, sized for a 2-core CPU: a 4x4 grid of 7x7 patches (16 + [CLS] tokens),
#   4 blocks of dim 64. On 4,000 digits it beat 4x4 patches both per epoch (88.5% vs 79.6% after
#   10 epochs) and per second (2.5x faster), so the CPU budget buys more epochs.
# `mnistvit`: asnelt/mnistvit's network (99.65% on full MNIST in its recipe), 11M parameters.
# `micro`: for tests only.
VIT_PRESETS: dict[str, ViTConfig] = {
    "lab": ViTConfig(patch_size=4, dim=8, depth=2, heads=2, mlp_dim=32, pos_encoding="sinusoidal"),
    "tiny": ViTConfig(patch_size=7, dim=64, depth=4, heads=4, mlp_dim=128),
    "mnistvit": ViTConfig(patch_size=4, dim=420, depth=9, heads=28, mlp_dim=615, dropout=0.06),
    "micro": ViTConfig(patch_size=7, dim=16, depth=1, heads=2, mlp_dim=32),
}


# torchvision's VGG config 'D' (VGG16): conv widths, 'M' for a 2x2 max-pool.
VGG16_LAYERS = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


def _check_image_size(name: str, size: int, minimum: int) -> None:
    if size < minimum:
        raise UserError(f"{name} needs --image-size of at least {minimum}, got {size}")


@dataclasses.dataclass(frozen=True, slots=True)
class VGGConfig:
    """VGG16 (Simonyan & Zisserman 2015) as torchvision builds it; see `jaxvision.models.vgg`."""

    num_classes: int = 10
    image_size: int = 224  # inputs are resized to this and replicated to 3 channels
    layers: tuple = VGG16_LAYERS
    hidden: int = 4096
    dropout: float = 0.5
    in_channels: int = 3
    pool_size: int = 7  # AdaptiveAvgPool2d((7, 7)) before the classifier

    def __post_init__(self):
        _check_image_size("vgg16", self.image_size, 2 ** self.layers.count("M"))


@dataclasses.dataclass(frozen=True, slots=True)
class AlexNetConfig:
    """AlexNet (Krizhevsky 2014, "One weird trick") as torchvision builds it."""

    num_classes: int = 10
    image_size: int = 224
    hidden: int = 4096
    dropout: float = 0.5
    in_channels: int = 3
    pool_size: int = 6  # AdaptiveAvgPool2d((6, 6)) before the classifier

    def __post_init__(self):
        _check_image_size("alexnet", self.image_size, 63)  # the smallest that survives 3 pools


@dataclasses.dataclass(frozen=True, slots=True)
class FasterRCNNConfig:
    """torchvision's Faster R-CNN, repurposed as a digit classifier; see
    `torch_reference.models.detector` and `jaxvision.core.detection`."""

    num_classes: int = 10  # digits; the detector adds background as its label 0
    detector: str = "mobilenet_v3_320"  # fasterrcnn_<detector>: mobilenet_v3_large_320_fpn, ...
    # The transform's min_size = max_size: the (square) image is resized to this before the
    # backbone. torchvision's 320 and 800 are for photographs; a digit needs far fewer pixels.
    image_size: int = 64
    in_channels: int = 3  # grey digits are replicated to RGB
    # RoIs sampled per image for the box head's loss; torchvision's 512 is sized for crowded
    # photos. An MNIST image holds one object, and on a CPU the RoIAlign backward dominates.
    box_batch_size_per_image: int = 32
    trainable_backbone_layers: int = 3  # with pretrained weights; from scratch all train

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise UserError(
                f"unknown --detector {self.detector!r}; available: {', '.join(DETECTORS)}"
            )
        _check_image_size("faster_rcnn", self.image_size, 32)

    @property
    def detector_classes(self) -> int:
        return self.num_classes + 1  # + background

    # The settings torchvision's builders give each detector, in one place for both backends
    # (`torch_reference.models.detector`, `jaxvision.models.detector`).
    @property
    def anchor_sizes(self) -> tuple[tuple[int, ...], ...]:
        """Anchor sizes per feature level: MobileNetV3's three levels each take all five; the
        ResNet-50 FPN's five levels one each."""
        if self.detector == "mobilenet_v3_320":
            return ((32, 64, 128, 256, 512),) * 3
        return ((32,), (64,), (128,), (256,), (512,))

    @property
    def rpn_pre_nms_top_n(self) -> dict[str, int]:
        """Proposals kept per feature level before NMS, in training and at test."""
        test = 150 if self.detector == "mobilenet_v3_320" else 1000  # the 320 model's own
        return {"train": 2000, "test": test}

    @property
    def rpn_post_nms_top_n(self) -> dict[str, int]:
        """Proposals kept per image after NMS, in training and at test."""
        return self.rpn_pre_nms_top_n

    @property
    def frozen_bn_eps(self) -> float:
        """FrozenBatchNorm2d's eps under the COCO weights: torchvision's ResNet-50 FPN builder
        overwrites it with 0 (`overwrite_eps`), the MobileNet one keeps 1e-5."""
        return 0.0 if self.detector == "resnet50_fpn" else 1e-5

    @property
    def rpn_score_thresh(self) -> float:
        return 0.05 if self.detector == "mobilenet_v3_320" else 0.0


# --detector -> torchvision's builder and its COCO weights (the COCO_V1 entry of the enum).
DETECTORS = {
    "mobilenet_v3_320": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "resnet50_fpn": "fasterrcnn_resnet50_fpn",
}
FASTER_RCNN_PRESETS: dict[str, FasterRCNNConfig] = {
    name: FasterRCNNConfig(detector=name) for name in DETECTORS
}

VGG_PRESETS: dict[str, VGGConfig] = {"vgg16": VGGConfig()}
ALEXNET_PRESETS: dict[str, AlexNetConfig] = {"alexnet": AlexNetConfig()}
