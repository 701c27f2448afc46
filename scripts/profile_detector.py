"""Where the detector's detection time goes, stage by stage, in JAX and torch with the same weights.

    python scripts/profile_detector.py                                  # untrained (seed 0)
    python scripts/profile_detector.py --checkpoint runs/ckpt-faster_rcnn --images 100

The weights are either torchvision's random initialisation (`--seed`) or a checkpoint of either
backend (`train.py --arch faster_rcnn --checkpoint-dir`), converted to the other framework. On
the first `--images` digits of MNIST's official test set, eval mode, each stage is timed on its
own: JAX's as one `jax.jit` of that stage (its inputs computed beforehand, the result waited
for), torch's eagerly under `no_grad`. Each repeat times every JAX stage, then every torch stage;
the table gives each stage's median over `--repeats`, in milliseconds per batch of `--images`.
An untrained RPN passes far more proposals to the box head than a trained one, so the box head's
share depends on the weights: the table's last row counts them.

JAX runs under the detector's default XLA settings (`jaxvision.apps.jax_backend`), torch with
its default threads. A timing tool, not a test: the parity tests check the stages' values.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from jaxvision.apps.jax_backend import start_devices, use_default_xla_flags  # noqa: E402
from jaxvision.core.archs import get_arch  # noqa: E402

use_default_xla_flags(get_arch("faster_rcnn"))  # before JAX touches a device

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from jaxvision.apps import backends  # noqa: E402
from jaxvision.core import data, detection, flags  # noqa: E402
from jaxvision.core.archs import config_from_dict  # noqa: E402
from jaxvision.core.errors import UserError, exit_code  # noqa: E402
from jaxvision.core.model_configs import FasterRCNNConfig  # noqa: E402
from jaxvision.interop import convert  # noqa: E402
from jaxvision.models import build_model  # noqa: E402
from jaxvision.models.detector import FasterRCNN  # noqa: E402
from jaxvision.training.detection import as_rgb as jax_rgb  # noqa: E402
from torch_reference.detection import as_rgb as torch_rgb  # noqa: E402
from torch_reference.detection import detect as torch_detect  # noqa: E402
from torch_reference.detection import detector_loss, make_targets  # noqa: E402
from torch_reference.models.detector import build_detector, replace_box_predictor  # noqa: E402

STAGES = ("transform + backbone", "RPN: heads, top-n, NMS",
          "box head: RoIAlign, fc6, fc7, predictor", "postprocess: per-class NMS", "detect, whole",
          "test loss (JAX on detection's features; torch runs its backbone again)")  # fmt: skip


def twin_models(checkpoint: str | None, seed: int):
    """(flax model in eval mode, torch model in eval mode) holding the same weights."""
    if checkpoint is None:
        torch.manual_seed(seed)
        config = FasterRCNNConfig()
        tm = build_detector(config).eval()
        shell = nnx.eval_shape(lambda: FasterRCNN(config, rngs=nnx.Rngs(seed)))
        fm = convert.load_torch_state_dict(shell, tm.state_dict())
        return nnx.view(fm, use_running_average=True), tm
    backend, path, meta = backends.for_checkpoint(checkpoint)
    if meta["arch"] != "faster_rcnn":
        raise UserError(f"{path} holds a {meta['arch']} model; pass a faster_rcnn checkpoint "
                        "(train.py --arch faster_rcnn --checkpoint-dir DIR)")  # fmt: skip
    model = backend.load_model(path, meta)
    config = config_from_dict("faster_rcnn", meta["model_config"])
    pretrained = meta["config"].get("pretrained", False)  # COCO's structure: frozen BatchNorm
    if isinstance(model, torch.nn.Module):
        shell = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0), pretrained=pretrained))
        fm = convert.load_torch_state_dict(shell, model.state_dict())
        return nnx.view(fm, use_running_average=True), model.eval()
    tm = build_detector(config, pretrained=pretrained)
    if pretrained:
        replace_box_predictor(tm, config.detector_classes)
    tm.load_state_dict(convert.to_torch_state_dict(model))
    return model, tm.eval()


def jax_stages(model: FasterRCNN, images: np.ndarray, labels: np.ndarray):
    """Each stage as a jitted function of its inputs, with those inputs: [(fn, args)]."""
    graphdef, state = nnx.split(model)
    x = jax_rgb(jax.numpy.asarray(images))
    size = model.resized(x.shape[1])

    def staged(body):
        return jax.jit(lambda state, *a: body(nnx.merge(graphdef, state), *a))

    backbone = staged(lambda m, x: m.backbone(m.transform(x)))
    proposals = staged(lambda m, f: m.proposals(f, size, "test")[2::2])
    box = staged(lambda m, f, p, v: m.box_outputs(f, p, v, size)[1:])
    post = staged(lambda m, c, r, p, v: m.postprocess(c, r, p, v, size))
    detect = staged(lambda m, x: m.detect(x)[0])

    def test_loss(m, x, features, boxes, labels, ink):  # as the evaluation computes it
        key = jax.random.key(0)
        losses = m.losses(x, boxes[:, None], labels[:, None] + 1, ink[:, None], key,
                          image_valid=ink, features=features, packed=True)  # fmt: skip
        return sum(losses.values())

    loss = staged(test_loss)
    features = backbone(state, x)
    props, valid = proposals(state, features)
    logits, regression = box(state, features, props, valid)
    calls = [(backbone, (state, x)), (proposals, (state, features)),
             (box, (state, features, props, valid)),
             (post, (state, logits, regression, props, valid)), (detect, (state, x)),
             (loss, (state, x, features, *ink_targets(images, labels)))]  # fmt: skip
    return calls, float(valid.sum(1).mean())


def torch_stages(model, images: np.ndarray, labels: np.ndarray):
    """torchvision's detection (as `torch_reference.detection.detect` runs it), stage by stage."""
    x = torch_rgb(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    heads = model.roi_heads
    with torch.no_grad():
        batch, _ = model.transform(list(x))
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        logits, regression = heads.box_predictor(
            heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        )

    def backbone():
        return model.backbone(model.transform(list(x))[0].tensors)

    def box():
        pooled = heads.box_roi_pool(features, proposals, batch.image_sizes)
        return heads.box_predictor(heads.box_head(pooled))

    calls = [backbone, lambda: model.rpn(batch, features), box,
             lambda: heads.postprocess_detections(logits, regression, proposals,
                                                  batch.image_sizes),
             lambda: torch_detect(model, x)]  # fmt: skip
    boxes, labels, ink = map(torch.from_numpy, ink_targets(images, labels))
    targets = make_targets(boxes[ink], labels[ink] + 1)
    calls.append(lambda: detector_loss(model, x[ink], targets))
    return calls, float(np.mean([len(p) for p in proposals]))


def ink_targets(images: np.ndarray, labels: np.ndarray):
    """Each image's ground truth as training has it: its ink's box (margin 0, the detector's
    default), its digit, and whether it has ink at all."""
    boxes, ink = detection.ink_boxes(images, 0)
    return boxes, labels.astype(np.int64), ink


def timed(fn, *args) -> float:
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)  # torch tensors are not JAX arrays: passed through
    return (time.perf_counter() - start) * 1e3


def profile(args: argparse.Namespace) -> None:
    if args.images < 1 or args.repeats < 1:
        raise UserError("--images and --repeats must be at least 1")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32), got {args.seed}")
    start_devices()  # a JAX_PLATFORMS this machine cannot start: one line
    fm, tm = twin_models(args.checkpoint, args.seed)
    images, labels = (a[: args.images] for a in data.load_official_mnist_test())
    where = args.checkpoint or f"untrained, seed {args.seed}"
    print(f"faster_rcnn ({fm.config.detector}, {fm.config.image_size} px, {where}), "
          f"{len(images)} test digits, median of {args.repeats}; jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__}", flush=True)  # fmt: skip
    start = time.perf_counter()
    j_calls, j_props = jax_stages(fm, images, labels)
    for fn, a in j_calls:  # compile
        jax.block_until_ready(fn(*a))
    print(f"JAX stages compiled in {time.perf_counter() - start:.1f} s", flush=True)
    t_calls, t_props = torch_stages(tm, images, labels)
    with torch.no_grad():
        for fn in t_calls:  # warm up
            fn()
        times = {"jax": [[] for _ in STAGES], "torch": [[] for _ in STAGES]}
        for r in range(args.repeats):
            for i, (fn, a) in enumerate(j_calls):
                times["jax"][i].append(timed(fn, *a))
            for i, fn in enumerate(t_calls):
                times["torch"][i].append(timed(fn))
            j, t = times["jax"][-1][-1], times["torch"][-1][-1]
            print(f"repeat {r + 1}/{args.repeats}: detect {j:.0f} ms (JAX), {t:.0f} ms (torch)",
                  file=sys.stderr, flush=True)  # fmt: skip
    print("\n| stage | JAX ms | torch ms | torch ÷ JAX |\n|---|---|---|---|")
    for i, stage in enumerate(STAGES):
        j, t = (statistics.median(times[b][i]) for b in ("jax", "torch"))
        print(f"| {stage} | {j:.1f} | {t:.1f} | {t / j:.2f}× |")
    print(f"| proposals per image (the box head's rows) | {j_props:.1f} | {t_props:.1f} | |")


def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(prog="profile_detector.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a faster_rcnn checkpoint folder of either backend (default: untrained)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="torch seed of the untrained weights (default: 0)"
    )
    p.add_argument(
        "--images",
        type=int,
        default=100,
        help="test digits per batch (default: 100, the evaluation batch)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (default: 5)")
    return p


if __name__ == "__main__":
    sys.exit(exit_code(lambda: profile(build_parser().parse_args())))
