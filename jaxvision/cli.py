"""The `train` command line: argparse -> TrainConfig -> a backend's train_and_evaluate.

Exit codes: 0 success; 2 bad input (unknown arch or backend, unreadable data, ...); 1 training
diverged (NaN/inf loss); 130 interrupted. Every failure the user can act on is one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxvision import configs, data, run
from jaxvision.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train one of the lab's models on an MNIST-family dataset, in JAX or PyTorch, "
        "and write metrics.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    built = ", ".join(configs.ARCH_PRESETS)
    p.add_argument("--arch", default="cnn", help=f"model to train (built: {built})")
    p.add_argument("--backend", default="jax", help="jax or torch")
    p.add_argument("--preset", default=None, help="model preset; default: the arch's default "
                   "(cnn: lab). 'tiny' presets are for smoke tests")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", help=f"one of {', '.join(data.DATASETS)}")
    g.add_argument("--data-source", default="auto", choices=data.SOURCES,
                   help="auto: --data-dir if given, else a local copy, else (mnist) the bundled "
                   "5,000-digit sample; never the network")
    g.add_argument("--data-dir", default=None, help="folder with IDX files (.gz or raw), or "
                   "torchvision's root holding <Name>/raw/")
    g.add_argument("--tfds-data-dir", default=None, help="TFDS data dir (default: TFDS's own)")
    g = p.add_argument_group("training (unset: the arch's default, shown in brackets)")
    d = run.ARCH_DEFAULTS["cnn"]
    g.add_argument("--epochs", type=int, default=None, help=f"[cnn: {d['epochs']}]")
    g.add_argument("--batch-size", type=int, default=None, help=f"[cnn: {d['batch_size']}]")
    g.add_argument("--lr", type=float, default=None, help=f"learning rate [cnn: {d['lr']}]")
    g.add_argument("--optimizer", default=None, help=f"adam or sgd [cnn: {d['optimizer']}]")
    g.add_argument("--momentum", type=float, default=None, help=f"SGD momentum [{d['momentum']}]")
    g.add_argument("--seed", type=int, default=0, help="initialisation, dropout and data order")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder [runs/<arch>-<backend>-<time>/]")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or epoch lines")
    return p


def config_from_args(args: argparse.Namespace) -> run.TrainConfig:
    configs.check_arch(args.arch)
    defaults = run.ARCH_DEFAULTS[args.arch]

    def pick(name):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    return run.TrainConfig(
        arch=args.arch, backend=args.backend, preset=args.preset, dataset=args.dataset,
        data_source=args.data_source, data_dir=args.data_dir, tfds_data_dir=args.tfds_data_dir,
        epochs=pick("epochs"), batch_size=pick("batch_size"), lr=pick("lr"),
        optimizer=pick("optimizer"), momentum=pick("momentum"), seed=args.seed, out=args.out,
        progress=not args.no_progress,
    )


def backend_trainer(backend: str):
    if backend == "jax":
        from jaxvision.train import train_and_evaluate
    else:
        from torch_reference.train import train_and_evaluate
    return train_and_evaluate


def train(config: run.TrainConfig) -> dict:
    """Loads the data, trains, writes metrics.json, prints the results row; returns the record."""
    configs.get_config(config.arch, config.preset)  # fail on a bad preset before loading data
    dataset = data.load_dataset(config.dataset, source=config.data_source,
                                data_dir=config.data_dir, tfds_data_dir=config.tfds_data_dir)
    train_and_evaluate = backend_trainer(config.backend)
    result = train_and_evaluate(config, dataset)
    record = run.metrics_record(config, dataset, result)
    out_dir = Path(config.out) if config.out else run.default_out_dir(config)
    path = run.write_metrics(record, out_dir)
    print(run.RESULTS_HEADER)
    print(run.results_row(record))
    print(f"wrote {path}")
    return record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(config_from_args(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
