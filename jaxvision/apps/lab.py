"""The lab, reproduced: every arch in both backends, CPU-sized, then the comparison report.

    python scripts/run_lab.py                  # about 70 min on 2 cores (the JAX detector: 7 min)
    python scripts/run_lab.py --dry-run        # print the training commands only

Each run is `scripts/train.py --recipe lab-cpu` (or `lab-pretrained`: the arch's recipes in
`jaxvision.core.archs`) in a subprocess, exactly as a user would type it (the commands are
printed), writing `<out>/<arch>-<backend>/metrics.json`; then `jaxvision.core.report` builds
`comparison.md`, `.csv` and `.png` in `<out>`. Offline, VGG16 and AlexNet start from torchvision's
random initialisation and train every layer at a small image size, and Faster R-CNN trains from
scratch; `--pretrained` uses torchvision's weights instead (they must be in torch hub's cache).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import subprocess
import sys
import time
from pathlib import Path

from jaxvision.apps import train
from jaxvision.core import flags, report, results
from jaxvision.core.archs import ARCHS
from jaxvision.core.checkpoint import Checkpoints
from jaxvision.core.config import BACKENDS, TrainConfig
from jaxvision.core.errors import RunFailed, UserError, exit_code

REPO = Path(__file__).resolve().parents[2]


def commands(
    archs, backends, out: Path, pretrained: bool, extra: list[str], checkpoints: Path | None = None
) -> list[list[str]]:
    """The train.py command of each run; its --out is last. With `checkpoints`, each run
    checkpoints into its own folder there, named as its --out is."""
    recipe = "lab-pretrained" if pretrained else "lab-cpu"
    cmds = []
    for arch in archs:
        for backend in backends:
            if backend not in ARCHS[arch].backends:
                continue
            run = f"{arch}-{backend}"
            own = ["--checkpoint-dir", str(checkpoints / run)] if checkpoints else []
            cmds.append(
                [
                    sys.executable,
                    str(REPO / "scripts" / "train.py"),
                    "--arch",
                    arch,
                    "--backend",
                    backend,
                    "--recipe",
                    recipe,
                    *extra,
                    *own,
                    "--out",
                    str(out / run),
                ]
            )
    return cmds


# Set per run from run_lab.py's own flags (a later flag after -- would win: a ViT trained into
# the CNN's folder, or every run into one --checkpoint-dir, where the second is refused).
LAB_SETS = ("arch", "backend", "out", "checkpoint_dir")


def _train_parser() -> argparse.ArgumentParser:
    def refuse(message: str):
        raise UserError(message)

    parser = train.build_parser()
    parser.error = refuse  # argparse's usage errors as a UserError, not an exit
    return parser


def check_extra(extra: list[str]) -> None:
    """A UserError when the flags after `--` set what the lab sets for each run (a later flag
    would win: a ViT trained into the CNN's folder)."""
    given = flags.values(_train_parser().parse_args(extra), TrainConfig)
    owned = [name.replace("_", "-") for name in LAB_SETS if name in given]
    if owned:
        raise UserError(f"{', '.join('--' + n for n in owned)} after -- would override the lab's "
                        "own; use run_lab.py's --archs, --backends, --out and "
                        "--checkpoint-dir")  # fmt: skip
    if given.get("resume"):
        raise UserError("--resume after -- would resume every run, and refuse the finished "
                        "ones; resume the interrupted run alone with its train.py command and "
                        "--resume, then scripts/compare.py the runs' metrics.json")  # fmt: skip


def check_flags(argv: list[str], dry_run: bool = False) -> None:
    """A UserError naming the run when train.py would refuse its flags (a flag after `--` that
    does not apply to one of the archs, say), and, unless `dry_run`, what it would refuse before
    its data loads: an --out it cannot write, pretrained weights it cannot find (or fetch)."""
    try:
        config = train.config_from_args(_train_parser().parse_args(argv))
        if not dry_run:
            results.probe_writable(Path(config.out), "--out", train.output_files(config))
            if config.checkpoint_dir:  # a folder that holds checkpoints: refused before any run
                results.probe_writable(Path(config.checkpoint_dir), "--checkpoint-dir")
                Checkpoints.check_folder(config)
            if config.pretrained:  # torch's loader: the JAX backend converts its file
                from torch_reference.pretrained import find_weights, weights_name

                find_weights(weights_name(config.arch, config.preset), config.weights)
    except UserError as e:
        raise UserError(f"train.py {' '.join(argv[:4])}: {e}") from None


def run_lab(args: argparse.Namespace) -> None:
    """Trains every requested arch and backend, then writes the report."""
    archs = [a for a in args.archs.split(",") if a]
    backends = [b for b in args.backends.split(",") if b]
    for name, given in (("--archs", archs), ("--backends", backends)):
        if twice := sorted({x for x in given if given.count(x) > 1}):
            raise UserError(f"{name} names {', '.join(twice)} more than once; give each once")
    for a in archs:
        if a not in ARCHS:
            raise UserError(f"unknown arch {a!r} in --archs; available: {', '.join(ARCHS)}")
    for b in backends:
        if b not in BACKENDS:
            raise UserError(
                f"unknown backend {b!r} in --backends; available: {', '.join(BACKENDS)}"
            )
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"lab-{stamp}"
    if not args.dry_run:
        results.probe_writable(out, "--out", report.REPORT_FILES)
    cmds = commands(archs, backends, out, args.pretrained, extra, checkpoints)
    for cmd in cmds:
        check_flags(cmd[2:], args.dry_run)  # every run's, before the first one trains
    check_extra(extra)  # after: an unknown flag is named with the run that refuses it
    if not cmds:
        raise UserError("nothing to run: no arch given trains in the backends given")
    for i, cmd in enumerate(cmds, 1):
        shown = shlex.join(["python", *map(str, cmd[1:])]).replace(str(REPO) + "/", "")
        print(f"[{i}/{len(cmds)}] {shown}", flush=True)
        if args.dry_run:
            continue
        t0 = time.perf_counter()
        r = subprocess.run(cmd)
        if r.returncode != 0:
            raise RunFailed(
                f"run {i} ({shown}) failed with exit code {r.returncode}; its message is above"
            )
        print(f"[{i}/{len(cmds)}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.dry_run:
        return
    runs = report.load_runs([c[-1] for c in cmds])
    title = "The lab on " + (runs[0].get("host") or "this machine")
    paths = report.write_report(runs, out, title)
    print(paths["md"].read_text(), end="")
    for path in paths.values():
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = flags.Parser(
        prog="run_lab.py",
        description="Train every arch in both backends (CPU-sized settings), then write the "
        "comparison report (markdown, CSV, PNG).",
    )
    p.add_argument("--archs", default=",".join(ARCHS),
                   help=f"comma-separated archs [{','.join(ARCHS)}]")  # fmt: skip
    p.add_argument("--backends", default="jax,torch", help="comma-separated backends [jax,torch]")
    p.add_argument("--out", default=None, help="output folder [runs/lab-<time>/]")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="torchvision's weights for vgg16, alexnet, faster_rcnn (cached)",
    )
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="checkpoint each run in DIR/<arch>-<backend> (an interrupted run resumes "
                   "with its own train.py command and --resume)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument(
        "extra",
        nargs=argparse.REMAINDER,
        help="after --: flags passed to every train.py run (e.g. -- --dataset fashion_mnist)",
    )
    args, unknown = p.parse_known_args(argv)
    if unknown:  # most likely train.py's flags, given before the `--`
        p.error(f"unrecognized arguments: {' '.join(unknown)} (train.py's flags go after --, "
                f"e.g. run_lab.py -- {unknown[0]} ...)")  # fmt: skip
    p.refuse_empty(args, "archs", "out", "checkpoint_dir")
    return exit_code(lambda: run_lab(args))
