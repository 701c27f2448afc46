"""The `train` command line: flags -> TrainConfig -> a backend's train_and_evaluate.

Every flag is a `TrainConfig` field (`jaxvision.core.config`), or one of the launch options
below; `--help` is generated from them, with each arch's recipe value in brackets.

Exit codes: 0 success; 2 bad input (unknown arch or backend, unreadable data, ...); 1 training
diverged (NaN/inf loss), ran out of memory, or filled the disk; 130 interrupted (Ctrl-C); 143
stopped by SIGTERM (a scheduler's preemption; with --checkpoint-dir both save first). Every
failure the user can act on is one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from jaxvision.apps import backends
from jaxvision.core import attention, config, data, figures, flags, results
from jaxvision.core.archs import get_arch
from jaxvision.core.config import TrainConfig
from jaxvision.core.errors import UserError, exit_code, out_of_memory, writing
from jaxvision.core.model_configs import DETECTORS

JOIN_TIMEOUT_S = 300  # jax.distributed.initialize's own default


@dataclasses.dataclass(frozen=True)
class Launch:
    """Flags that start the process rather than configure the run."""

    detector: str | None = dataclasses.field(default=None, metadata=flags.flag(
        "mobilenet_v3_320 (torchvision's fasterrcnn_mobilenet_v3_large_320_fpn) or "
        "resnet50_fpn (fasterrcnn_resnet50_fpn); the same as --preset [mobilenet_v3_320]",
        group=config.DETECTOR,
        choices=list(DETECTORS)))  # fmt: skip
    distributed: bool = dataclasses.field(default=False, metadata=flags.flag(
        "multi-host: call jax.distributed.initialize first; without the three flags below JAX "
        "reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or detects SLURM / "
        "Open MPI", group=config.DEVICES))  # fmt: skip
    coordinator_address: str | None = dataclasses.field(
        default=None, metadata=flags.flag("host:port of process 0", group=config.DEVICES)
    )
    num_processes: int | None = dataclasses.field(
        default=None, metadata=flags.flag("processes in the run", group=config.DEVICES)
    )
    process_id: int | None = dataclasses.field(
        default=None, metadata=flags.flag("this process's rank", group=config.DEVICES)
    )
    join_timeout: int | None = dataclasses.field(default=None, metadata=flags.flag(
        f"seconds to wait for every process to join, then stop with one line [{JOIN_TIMEOUT_S}]",
        group=config.DEVICES))  # fmt: skip

    def distributed_args(self) -> tuple | None:
        """init_distributed's arguments, or None for a single-process run."""
        args = (self.coordinator_address, self.num_processes, self.process_id)
        if self.distributed or any(a is not None for a in args):
            timeout = JOIN_TIMEOUT_S if self.join_timeout is None else self.join_timeout
            if not 1 <= timeout <= 86_400:
                raise UserError(f"--join-timeout must be 1 to 86400 seconds, got {timeout}")
            return (*args, timeout)
        if self.join_timeout is not None:
            raise UserError("--join-timeout does not apply here: it is for --distributed runs")
        return None


def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(
        prog="train.py",
        description="Train one of the lab's models on an MNIST-family dataset, in JAX or PyTorch, "
        "and write metrics.json.",
    )
    groups = {}
    for group in (config.MODEL, config.DATA, config.TRAINING, config.FINE_TUNING,
                  config.DETECTOR, config.DEVICES, config.CHECKPOINTS, config.REPRODUCIBILITY,
                  config.OUTPUT):  # fmt: skip
        groups[group] = p.add_argument_group(group)
    flags.add_flags(p, TrainConfig, groups, default_text=config.recipe_defaults)
    flags.add_flags(p, Launch, groups)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = flags.values(args, TrainConfig)
    arch = get_arch(given.get("arch", "cnn"))
    if args.detector is not None:
        if not arch.detector:
            raise UserError(f"--detector is for --arch faster_rcnn, not {arch.name}")
        if given.get("preset") not in (None, args.detector):
            raise UserError(f"--detector {args.detector} and --preset {given['preset']} disagree")
        given["preset"] = args.detector
    return TrainConfig(**given)


def save_attention(
    config: TrainConfig, dataset: data.Dataset, result: results.RunResult, out_dir: Path
) -> Path:
    """attention.png: the first test digit of each class above its attention rollout."""
    model_config = result.model.config
    first = [np.flatnonzero(dataset.y_test == c) for c in range(dataset.num_classes)]
    idx = np.array([f[0] for f in first if len(f)])
    images = dataset.x_test[idx]  # (n, H, W, C) uint8
    attns, preds = backends.get(config.backend).attention_weights(result.model, images, dataset)
    rollout = attention.attention_rollout(attns)
    has_cls = model_config.pool == "cls"
    maps = attention.patch_map(rollout, model_config.grid, has_cls)
    title = (
        f"{config.arch} ({config.resolved_preset}), "
        f"{config.backend}: attention rollout over {model_config.depth} layers, "
        f"{'[CLS] token row' if has_cls else 'mean of token rows'}"
    )
    return attention.save_attention_grid(
        images[..., 0], maps, dataset.y_test[idx], preds, out_dir / "attention.png", title
    )


def write_figures(config, dataset, result, out_dir: Path) -> list[Path]:
    """confusion.png, and (classifiers) mistakes.png: the most confidently wrong test images,
    from the last evaluation's predictions and their probabilities (no second pass)."""
    classes = dataset.classes
    title = f"{config.arch} ({config.resolved_preset}), {config.backend}, {dataset.name}"
    cm = figures.confusion_matrix(dataset.y_test, result.predictions, dataset.num_classes)
    paths = [figures.save_confusion(cm, classes, out_dir / "confusion.png", title)]
    if not config.arch_spec.detector:
        preds, confidence = result.predictions, result.confidence
        index = figures.worst_mistakes(dataset.y_test, preds, confidence)
        path = out_dir / "mistakes.png"
        paths.append(figures.save_mistakes(dataset.x_test, dataset.y_test, preds, confidence,
                                           index, classes, path, title))  # fmt: skip
    return paths


def write_torch_weights(config: TrainConfig, result: results.RunResult, out_dir: Path) -> Path:
    """model.pth: the trained weights as a torch state_dict, whichever backend trained them, so
    that torchvision (or torch_reference) loads them with `load_state_dict`."""
    path = out_dir / "model.pth"
    with writing(path):
        return backends.get(config.backend).save_torch_weights(result.model, path)


def output_files(config: TrainConfig) -> list[str]:
    """The files a run writes in --out."""
    names = ["metrics.json", "confusion.png"]
    names += [] if config.arch_spec.detector else ["mistakes.png"]
    names += ["attention.png"] if config.save_attention else []
    return names + (["model.pth"] if config.save_weights else [])


def out_of_memory_fix(config: TrainConfig) -> str:
    """What a run that ran out of memory can ask for less of, with the values it asked for."""
    fix = (f"use a smaller --batch-size (this run: {config.batch_size}) or --eval-batch-size "
           f"({config.eval_batch_size})")  # fmt: skip
    if config.image_size is not None:
        fix += f", or --image-size ({config.image_size})"
    elif config.arch_spec.imagenet or config.arch_spec.detector:
        fix += ", or set a small --image-size"
    return fix


def train(config: TrainConfig) -> dict:
    """Loads the data, trains, writes metrics.json, prints the results row; returns the record."""
    for note in config.notes:
        print(f"note: {note}")
    backend = backends.get(config.backend)
    backend.check(config)  # missing weights, the device request: before the data is loaded
    if config.save_attention and not config.arch_spec.attention:
        raise UserError(f"--save-attention draws a ViT's attention; --arch {config.arch} has none")
    out_dir = Path(config.out) if config.out else results.default_out_dir(config)
    if backend.is_primary():  # unwritable outputs fail now, not after training
        results.probe_writable(out_dir, "--out", output_files(config))
        if (out_dir / "metrics.json").exists():
            print(f"note: --out {out_dir} already holds a run; this run replaces its "
                  "metrics.json and the figures it writes")  # fmt: skip
    if config.checkpoint_dir:
        results.probe_writable(Path(config.checkpoint_dir), "--checkpoint-dir")
    dataset = data.load_dataset(
        config.dataset,
        source=config.data_source,
        data_dir=config.data_dir,
        tfds_data_dir=config.tfds_data_dir,
        test_data_dir=config.test_data_dir,
    )
    if config.checkpoint_dir:  # a checkpoint that does not fit fails before any model is built
        backends.plan_checkpoint(config, dataset)
    with out_of_memory(out_of_memory_fix(config)):
        result = backend.train_and_evaluate(config, dataset)
    record = results.metrics_record(config, dataset, result)
    if not backend.is_primary():  # multi-host: process 0 writes the outputs
        return record
    path = results.write_metrics(record, out_dir)
    print(results.RESULTS_HEADER)
    print(results.results_row(record))
    if line := results.target_line(record):
        print(line)
    print(f"wrote {path}")
    for figure in write_figures(config, dataset, result, out_dir):
        print(f"wrote {figure}")
    if config.save_attention:
        print(f"wrote {save_attention(config, dataset, result, out_dir)}")
    if config.save_weights:
        print(f"wrote {write_torch_weights(config, result, out_dir)}")
    return record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    launch = Launch(**flags.values(args, Launch))

    def body():
        config = config_from_args(args)
        backends.get(config.backend).start(config, launch.distributed_args())
        train(config)

    return exit_code(body)
