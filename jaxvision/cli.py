"""The `train` command line: argparse -> TrainConfig -> a backend's train_and_evaluate.

Exit codes: 0 success; 2 bad input (unknown arch or backend, unreadable data, ...); 1 training
diverged (NaN/inf loss); 130 interrupted. Every failure the user can act on is one line on stderr.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from jaxvision import configs, data, run
from jaxvision.errors import UserError, exit_code


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless it is None (then its help says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train one of the lab's models on an MNIST-family dataset, in JAX or PyTorch, "
        "and write metrics.json.",
        formatter_class=_HelpFormatter,
    )
    built = ", ".join(configs.ARCH_PRESETS)
    p.add_argument("--arch", default="cnn", help=f"model to train (built: {built})")
    p.add_argument("--backend", default="jax", help="jax or torch")
    presets = "; ".join(
        f"{a}: {', '.join(ps)} [{configs.DEFAULT_PRESET[a]}]"
        for a, ps in configs.ARCH_PRESETS.items()
    )
    p.add_argument("--preset", default=None, help=f"model preset ({presets})")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", help=f"one of {', '.join(data.DATASETS)}")
    g.add_argument(
        "--data-source",
        default="auto",
        choices=data.SOURCES,
        help="auto: --data-dir if given, else a local copy, else (mnist) the bundled "
        "5,000-digit sample; never the network",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder with IDX files (.gz or raw), or torchvision's root holding <Name>/raw/",
    )
    g.add_argument("--tfds-data-dir", default=None, help="TFDS data dir (default: TFDS's own)")
    g = p.add_argument_group("training (unset: the arch's default, shown in brackets)")

    def arch_default(name, fmt="{}"):
        return (
            "["
            + ", ".join(f"{a}: {fmt.format(d[name])}" for a, d in run.ARCH_DEFAULTS.items())
            + "]"
        )

    g.add_argument("--epochs", type=int, default=None, help=arch_default("epochs"))
    g.add_argument("--batch-size", type=int, default=None, help=arch_default("batch_size"))
    g.add_argument(
        "--lr", type=float, default=None, help="peak learning rate " + arch_default("lr")
    )
    g.add_argument(
        "--optimizer", default=None, help="adam, adamw or sgd " + arch_default("optimizer")
    )
    g.add_argument(
        "--momentum", type=float, default=None, help="SGD momentum " + arch_default("momentum")
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="AdamW's decoupled decay, on weight matrices only " + arch_default("weight_decay"),
    )
    g.add_argument(
        "--schedule",
        default=None,
        help="constant, or cosine: linear warmup then cosine "
        "decay to 0 " + arch_default("schedule"),
    )
    g.add_argument("--warmup-epochs", type=float, default=None, help=arch_default("warmup_epochs"))
    g.add_argument(
        "--clip-norm",
        type=float,
        default=None,
        help="clip the global gradient norm; 0 is off " + arch_default("clip_norm"),
    )
    g.add_argument(
        "--label-smoothing", type=float, default=None, help=arch_default("label_smoothing")
    )
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random affine: rotation 15 deg, shift 10%%, scale 0.9-1.1, per image, on "
        "the device " + arch_default("augment"),
    )
    g = p.add_argument_group("fine-tuning (vgg16, alexnet, faster_rcnn)")
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize inputs to this (on the device; faster_rcnn: the transform's min_size and "
        "max_size) " + arch_default("image_size"),
    )
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="torchvision's weights (ImageNet; COCO for faster_rcnn), from --weights "
                   "or torch hub's cache " + arch_default("pretrained"))  # fmt: skip
    g.add_argument("--weights", default=None, help="a torchvision .pth state_dict to start from")
    g.add_argument(
        "--unfreeze",
        action="store_true",
        help="train the convolutional features too (at --feature-lr); faster_rcnn: the whole "
        "backbone, not only its last 3 layers",
    )
    g.add_argument(
        "--feature-lr",
        type=float,
        default=None,
        help="the features' learning rate with --unfreeze " + arch_default("feature_lr"),
    )
    g.add_argument(
        "--head-lr",
        type=float,
        default=None,
        dest="lr",
        help="the classifier's learning rate (the same as --lr)",
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=run.DTYPES,
        help="compute dtype; parameters stay float32",
    )
    g = p.add_argument_group("detector (faster_rcnn, torch backend)")
    g.add_argument(
        "--detector",
        default=None,
        choices=list(configs.DETECTORS),
        help="fasterrcnn_mobilenet_v3_large_320_fpn or fasterrcnn_resnet50_fpn (the same as "
        "--preset) [mobilenet_v3_320]",
    )
    g.add_argument(
        "--box-margin",
        type=int,
        default=0,
        help="pixels added around each digit's ink box (the detection target)",
    )
    g.add_argument("--score-threshold", type=float, default=0.5,
                   help="the top detection decides the class only if it scores at least this; "
                   "below it, the box head's best class does (a counted fallback)")  # fmt: skip
    g = p.add_argument_group("devices (JAX backend)")
    g.add_argument(
        "--devices",
        type=int,
        default=0,
        help="data-parallel over the first N devices; 0: every visible device (the batch is "
        "split across them: --batch-size must be a multiple of N)",
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize first; without the three flags below "
        "JAX reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or detects "
        "SLURM / Open MPI",
    )
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    g.add_argument("--process-id", type=int, default=None, help="this process's rank")
    g = p.add_argument_group("checkpoints")
    g.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save a checkpoint here after every epoch and on Ctrl-C (the last 3 are kept); "
        "JAX: orbax, torch: torch.save",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint-dir's latest checkpoint (same arch, preset, data, seed, "
        "batch size and optimiser; --epochs may grow)",
    )
    g = p.add_argument_group("reproducibility")
    g.add_argument("--seed", type=int, default=0, help="initialisation, dropout and data order")
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="GPU: deterministic kernels only, at some speed cost (JAX: XLA's "
        "--xla_gpu_deterministic_ops; torch: use_deterministic_algorithms). The CPU paths are "
        "deterministic without it",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder [runs/<arch>-<backend>-<time>/]")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or epoch lines")
    g.add_argument(
        "--save-weights",
        action="store_true",
        help="write model.pth, the trained weights as a torch state_dict (from either backend; "
        "VGG16 and AlexNet load into torchvision)",
    )
    g.add_argument(
        "--save-attention",
        action="store_true",
        help="ViT: write attention.png (attention rollout of test digits) to --out",
    )
    return p


def config_from_args(args: argparse.Namespace) -> run.TrainConfig:
    configs.check_arch(args.arch)
    if args.detector is not None:
        if args.arch != "faster_rcnn":
            raise UserError(f"--detector is for --arch faster_rcnn, not {args.arch}")
        if args.preset not in (None, args.detector):
            raise UserError(f"--detector {args.detector} and --preset {args.preset} disagree")
        args.preset = args.detector
    defaults = run.ARCH_DEFAULTS[args.arch]

    def pick(name):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    return run.TrainConfig(
        arch=args.arch,
        backend=args.backend,
        preset=args.preset,
        dataset=args.dataset,
        data_source=args.data_source,
        data_dir=args.data_dir,
        tfds_data_dir=args.tfds_data_dir,
        epochs=pick("epochs"),
        batch_size=pick("batch_size"),
        lr=pick("lr"),
        optimizer=pick("optimizer"),
        momentum=pick("momentum"),
        weight_decay=pick("weight_decay"),
        schedule=pick("schedule"),
        warmup_epochs=pick("warmup_epochs"),
        clip_norm=pick("clip_norm"),
        label_smoothing=pick("label_smoothing"),
        augment=pick("augment"),
        seed=args.seed,
        out=args.out,
        progress=not args.no_progress,
        save_attention=args.save_attention,
        image_size=pick("image_size"),
        pretrained=pick("pretrained"),
        weights=args.weights,
        unfreeze=args.unfreeze,
        feature_lr=pick("feature_lr"),
        dtype=args.dtype,
        box_margin=args.box_margin,
        score_threshold=args.score_threshold,
        devices=args.devices,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        deterministic=args.deterministic,
    )


def backend_trainer(backend: str):
    if backend == "jax":
        from jaxvision.train import train_and_evaluate
    else:
        from torch_reference.train import train_and_evaluate
    return train_and_evaluate


def save_attention(
    config: run.TrainConfig, dataset: data.Dataset, result: run.RunResult, out_dir: Path
) -> Path:
    """attention.png: the first test digit of each class above its attention rollout."""
    from jaxvision import attention

    if config.backend == "jax":
        from jaxvision.train import attention_weights
    else:
        from torch_reference.train import attention_weights
    model_config = result.model.config
    first = [np.flatnonzero(dataset.y_test == c) for c in range(dataset.num_classes)]
    idx = np.array([f[0] for f in first if len(f)])
    images = dataset.x_test[idx]  # (n, H, W, C) uint8
    attns, preds = attention_weights(result.model, images, dataset)
    rollout = attention.attention_rollout(attns)
    has_cls = model_config.pool == "cls"
    maps = attention.patch_map(rollout, model_config.grid, has_cls)
    title = (
        f"{config.arch} ({config.preset or configs.DEFAULT_PRESET[config.arch]}), "
        f"{config.backend}: attention rollout over {model_config.depth} layers, "
        f"{'[CLS] token row' if has_cls else 'mean of token rows'}"
    )
    return attention.save_attention_grid(
        images[..., 0], maps, dataset.y_test[idx], preds, out_dir / "attention.png", title
    )


def write_torch_weights(config: run.TrainConfig, result: run.RunResult, out_dir: Path) -> Path:
    """model.pth: the trained weights as a torch state_dict, whichever backend trained them, so
    that torchvision (or torch_reference) loads them with `load_state_dict`."""
    import torch

    if config.backend == "jax":
        from jaxvision import convert

        state_dict = convert.to_torch_state_dict(result.model)
    else:
        state_dict = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    path = out_dir / "model.pth"
    torch.save(state_dict, path)
    return path


def train(config: run.TrainConfig, save_weights: bool = False) -> dict:
    """Loads the data, trains, writes metrics.json, prints the results row; returns the record."""
    configs.get_config(config.arch, config.preset)  # fail on a bad preset before loading data
    if config.pretrained:  # and on missing weights
        from jaxvision import pretrained

        pretrained.find_weights(pretrained.weights_name(config.arch, config.preset), config.weights)
    if config.backend == "jax":  # the device request, before the data is loaded
        from jaxvision import parallel

        parallel.check_divisible(config.batch_size, parallel.make_data_mesh(config.devices))
    if config.save_attention and config.arch != "vit":
        raise UserError(f"--save-attention draws a ViT's attention; --arch {config.arch} has none")
    dataset = data.load_dataset(
        config.dataset,
        source=config.data_source,
        data_dir=config.data_dir,
        tfds_data_dir=config.tfds_data_dir,
    )
    if config.checkpoint_dir:  # a checkpoint that does not fit fails before any model is built
        from jaxvision import checkpoint

        checkpoint.plan(config, dataset)
    train_and_evaluate = backend_trainer(config.backend)
    result = train_and_evaluate(config, dataset)
    record = run.metrics_record(config, dataset, result)
    if config.backend == "jax":
        from jaxvision import parallel

        if not parallel.is_primary():  # multi-host: process 0 writes the outputs
            return record
    out_dir = Path(config.out) if config.out else run.default_out_dir(config)
    path = run.write_metrics(record, out_dir)
    print(run.RESULTS_HEADER)
    print(run.results_row(record))
    print(f"wrote {path}")
    if config.save_attention:
        print(f"wrote {save_attention(config, dataset, result, out_dir)}")
    if save_weights:
        print(f"wrote {write_torch_weights(config, result, out_dir)}")
    return record


XLA_DETERMINISTIC = "--xla_gpu_deterministic_ops=true"


def deterministic_kernels(backend: str) -> None:
    """--deterministic, set before either framework touches a GPU."""
    if backend == "jax":  # read when JAX starts its backend: this process has not yet
        flags = os.environ.get("XLA_FLAGS", "")
        if XLA_DETERMINISTIC not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {XLA_DETERMINISTIC}".strip()
    else:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement
        import torch

        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def start_distributed(args: argparse.Namespace) -> None:
    flags = (args.coordinator_address, args.num_processes, args.process_id)
    if not (args.distributed or any(f is not None for f in flags)):
        return
    if args.backend != "jax":
        raise UserError("--distributed is for the JAX backend; the torch backend runs one process")
    from jaxvision import parallel

    parallel.init_distributed(*flags)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        if args.deterministic:
            deterministic_kernels(args.backend)
        start_distributed(args)
        train(config_from_args(args), save_weights=args.save_weights)

    return exit_code(body)
