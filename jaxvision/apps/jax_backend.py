"""The JAX backend: Flax NNX models, trained with `jaxvision.training` on a device mesh.

torch is a heavy optional dependency here: only torchvision's pretrained weights and the export
of a torch state_dict need it, so `jaxvision.interop` (which imports torch) is imported inside
the methods that use it, and a JAX run that needs neither never loads torch.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src import xla_bridge  # JAX's own; `jax_started` says why

from jaxvision.core import archs
from jaxvision.core.bench import BenchWorker, median_time
from jaxvision.core.config import EVAL_BATCH_SIZE, TrainConfig
from jaxvision.core.data import Dataset
from jaxvision.core.errors import UserError
from jaxvision.core.results import RunResult
from jaxvision.models import build_model, initializers
from jaxvision.training import checkpoint, detection, parallel, trainer

XLA_DETERMINISTIC = "--xla_gpu_deterministic_ops=true"
# XLA's compilation for jaxvision's JAX runs when the user sets no XLA_FLAGS (docs/performance.md):
#   * YNNPACK for XLA's CPU matmul fusions, for the archs that gain from it (`Arch.cpu_ynn`: all
#     but the detector): the CNN trains 1.6x, the ViT up to 1.45x and AlexNet 1.3x faster on 2
#     CPU cores, and it computes the same function (parity_tests/test_xla_flags.py); the
#     detector trains and detects about 1.4x faster without it;
#   * for the archs that gain from it (`Arch.cpu_split`: the CNN and the ViT), the host split into
#     one CPU device per core, which the mesh's data parallelism trains over
#     (`parallel.make_data_mesh` takes the most of them that divide the batch): on 2 cores the
#     CNN trains about 1.5x and the ViT 1.2x faster than on one device with intra-op threads.
# Before a run's arch is known (the backend just created), the classifiers' YNN alone. A user's
# XLA_FLAGS, even an empty one, is left as it is. GPU runs ignore both flags.
YNN_DOT = "--xla_cpu_experimental_ynn_fusion_type=dot"
HOST_SPLIT = "--xla_force_host_platform_device_count"
# The flags this module set, so that a child process (the lab's runs, a test's CLI run) tells
# them from a user's and sets its own arch's.
OURS = "JAXVISION_DEFAULT_XLA_FLAGS"


def host_cores() -> int:
    """The cores this process may run on (its affinity mask; a container's CPU quota aside)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_xla_flags(arch: archs.Arch | None = None, cores: int | None = None) -> str:
    """The XLA_FLAGS a JAX run of `arch` gets by default ('' is XLA's own settings)."""
    cores = host_cores() if cores is None else cores
    flags = [YNN_DOT] if arch is None or arch.cpu_ynn else []
    if arch is not None and arch.cpu_split and cores > 1:
        flags.append(f"{HOST_SPLIT}={cores}")
    return " ".join(flags)


def jax_started() -> bool:
    """Whether JAX has created its backends, so that XLA_FLAGS is read already. JAX has no public
    call for it; where the private one is missing, say yes (the flags are then left alone)."""
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def use_default_xla_flags(arch: archs.Arch | None = None) -> None:
    """Sets XLA_FLAGS to `default_xla_flags` for `arch` unless the user set it. XLA reads it
    once, when JAX first touches a device: the backend sets it, if unset, when it is created
    (`arch` None), and for the run's arch in `start` and `bench`, before any model; once a
    device is in use it is left as it is."""
    current = os.environ.get("XLA_FLAGS")
    if current is not None and (current != os.environ.get(OURS) or arch is None):
        return  # the user's; or ours, already set for this run's arch (or its parent's)
    if current is not None and jax_started():
        return  # too late for this process; its children keep what it runs under
    os.environ["XLA_FLAGS"] = os.environ[OURS] = default_xla_flags(arch)


def start_devices() -> None:
    """Starts JAX's backends now, when the XLA_FLAGS of this run are set. A JAX_PLATFORMS that
    names a platform this machine cannot start (`cuda` without a GPU, a typo) is one line here,
    not an AssertionError or a RuntimeError from JAX's first use of a device. So is a backend
    that the user's XLA_FLAGS keep from starting (`--xla_force_host_platform_device_count=0`)."""
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS")
        unknown = isinstance(e, AssertionError) and not str(e)  # a named platform, none found
        why = str(e).splitlines()[0] if str(e) else "no such device is visible"
        user_flags = os.environ.get("XLA_FLAGS", "")
        user_flags = "" if user_flags == os.environ.get(OURS) else user_flags  # not our default
        if not platforms and user_flags and "initialize backend" in str(e):
            said = why.split(" (you may need")[0]  # JAX's advice is about plugins, not flags
            raise UserError(f"JAX cannot start under XLA_FLAGS={user_flags!r} ({said}); correct "
                            "or unset XLA_FLAGS") from None  # fmt: skip
        if not platforms or not (unknown or "initialize backend" in str(e)):
            raise  # a platform that started and then failed: its own error, whole
        raise UserError(f"JAX_PLATFORMS={platforms}: JAX cannot start it here ({why}); unset "
                        "JAX_PLATFORMS to use what this machine has, or install the platform's "
                        "jax plugin (CUDA: pip install -e '.[gpu]')") from None  # fmt: skip


class JaxBackend:
    name = "jax"

    def __init__(self):
        use_default_xla_flags()

    def check(self, config: TrainConfig) -> None:
        if config.checkpoint_dir:  # before the data loads, not at the first save
            checkpoint.utf8_folder(config.checkpoint_dir)
        if config.pretrained:
            from jaxvision.interop import pretrained  # torch: see the module's docstring

            pretrained.find_weights(pretrained.weights_name(config.arch, config.preset),
                                    config.weights)  # fmt: skip
        mesh = parallel.make_data_mesh(config.devices, config.batch_size)
        parallel.check_divisible(config.batch_size, mesh)
        visible = jax.device_count()
        if mesh.size < visible and not config.devices:
            print(f"note: --batch-size {config.batch_size} splits over {mesh.size} of the "
                  f"{visible} CPU devices; a multiple of {visible} would use them all")  # fmt: skip

    def start(self, config: TrainConfig, distributed: tuple | None) -> None:
        use_default_xla_flags(config.arch_spec)
        if config.deterministic:  # read when JAX starts its backend: this process has not yet
            flags = os.environ.get("XLA_FLAGS", "")
            if XLA_DETERMINISTIC not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} {XLA_DETERMINISTIC}".strip()
        if distributed is not None:
            parallel.init_distributed(*distributed)
        start_devices()

    def is_primary(self) -> bool:
        return parallel.is_primary()

    def create_model(self, config: TrainConfig, model_cfg, key: jax.Array, verbose: bool = True):
        """The Flax model to train: fresh, or torchvision's pretrained weights with a new
        `num_classes`-way last layer (VGG16 / AlexNet: ImageNet; Faster R-CNN: COCO, with a new
        box predictor)."""
        if not config.pretrained:
            return build_model(model_cfg, rngs=nnx.Rngs(params=key))
        from jaxvision.interop import pretrained  # torch: see the module's docstring

        if config.arch_spec.detector:
            return pretrained.coco_detector(model_cfg, config.weights, key, verbose)

        # Abstract: the weights fill every variable (VGG16's 138M random values would take 6 s).
        imagenet = dataclasses.replace(model_cfg, num_classes=1000)
        model = nnx.eval_shape(lambda: build_model(imagenet, rngs=nnx.Rngs(0)))
        pretrained.load_into_flax(model, config.arch, config.weights, verbose=verbose)
        inits = dict(kernel_init=initializers.lecun_normal(), bias_init=initializers.zeros)
        head = nnx.Linear(model_cfg.hidden, model_cfg.num_classes, rngs=nnx.Rngs(params=key),
                          **inits)  # fmt: skip
        model.classifier[len(model.classifier) - 1] = head
        model.config = model_cfg
        return model

    def train_and_evaluate(self, config: TrainConfig, data: Dataset) -> RunResult:
        init_key, _ = trainer.run_keys(config.seed)
        model = self.create_model(config, config.model_config(data), init_key)
        if config.arch_spec.detector:
            return detection.train_and_evaluate(config, data, model)
        return trainer.train_and_evaluate(config, data, model)

    def plan_checkpoint(self, config: TrainConfig, data: Dataset) -> None:
        checkpoint.JaxCheckpoints.plan(config, data)

    def read_meta(self, path: Path) -> dict:
        start_devices()  # a checkpoint's first reader, in predict.py, evaluate.py and the export
        return checkpoint.JaxCheckpoints.read_meta(path)

    def load_model(self, path: Path, meta: dict) -> nnx.Module:
        start_devices()
        return checkpoint.load_flax_model(path, meta)

    def classifier(self, path: Path, meta: dict, batch_size: int = EVAL_BATCH_SIZE):
        model = self.load_model(path, meta)
        return trainer.predictor(model, meta["mean"], meta["std"], batch_size)

    def predict_proba(self, model, images: np.ndarray, data: Dataset) -> np.ndarray:
        return np.exp(trainer.predictor(model, data.mean, data.std)(images))

    def torch_state_dict(self, model: nnx.Module) -> dict:
        from jaxvision.interop import convert  # torch: see the module's docstring

        return convert.to_torch_state_dict(model)

    def save_torch_weights(self, model: nnx.Module, path: Path) -> Path:
        from torch_reference.checkpoint import save_state_dict  # torch: see the docstring

        return save_state_dict(self.torch_state_dict(model), path)

    def write_weights(self, dst: Path, step: int, state_dict: dict, meta: dict) -> Path:
        from jaxvision.interop import convert  # torch: see the module's docstring

        start_devices()
        config = archs.config_from_dict(meta["arch"], meta["model_config"])
        pretrained = meta["config"].get("pretrained", False)
        # Abstract: the state_dict sets every variable (the detector's initialisation: 17 s).
        model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0), pretrained=pretrained))
        model = convert.load_torch_state_dict(model, state_dict)
        checkpoint.save_weights(dst, step, model, {**meta, "backend": self.name})
        return dst / str(step)

    def attention_weights(self, model, images: np.ndarray, data: Dataset):
        return trainer.attention_weights(model, images, data)

    def describe_device(self) -> str:
        return trainer.describe_device()

    def bench(self, config: TrainConfig, data: Dataset) -> JaxBench:
        use_default_xla_flags(config.arch_spec)
        start_devices()
        return JaxBench(self, config, data)


class JaxBench(BenchWorker):
    """A benchmark worker: the real training path (`Trainer.train_epoch`) and evaluation, whose
    `device_get` synchronises."""

    def __init__(self, backend: JaxBackend, config: TrainConfig, data: Dataset):
        init_key, _ = trainer.run_keys(config.seed)
        model_cfg = config.model_config(data)
        model = backend.create_model(config, model_cfg, init_key, verbose=False)
        cls = detection.DetectorTrainer if config.arch_spec.detector else trainer.Trainer
        self.trainer = cls(model, config, data)
        compile_s = self.trainer.compile()
        cost = self.trainer.step_cost()
        first_call_s = self.warm_up()
        self.info = dict(
            device=trainer.describe_device(self.trainer.mesh.size),
            params=trainer.count_params(model),
            image_size=getattr(model_cfg, "image_size", None),
            compile_s=compile_s + first_call_s,
            xla_flops_per_image=float(cost.get("flops", 0.0)) / config.batch_size,
        )

    @staticmethod
    def matmul_peak() -> float:
        """The FLOP/s of a large float32 matmul at the precision training uses: float32 on a
        CPU, XLA's default (TF32) on a GPU."""
        cpu = jax.devices()[0].platform == "cpu"
        n = 2048 if cpu else 8192
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        f = jax.jit(lambda a: jnp.dot(a, a, precision="highest" if cpu else None))
        return 2 * n**3 / median_time(lambda: f(a).block_until_ready())

    @staticmethod
    def float32_matmuls() -> str:
        """What a float32 matmul computes in, here: XLA's default is TF32 on an NVIDIA GPU."""
        default = jax.config.jax_default_matmul_precision in (None, "default", "bfloat16_3x")
        return "tf32" if jax.devices()[0].platform == "gpu" and default else "float32"

    def peak_device_mb(self) -> float | None:
        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else peak / 2**20
