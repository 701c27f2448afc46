"""`convert_checkpoint.py SRC DST`: move a trained model between frameworks.

SRC is a `--checkpoint-dir` (its latest checkpoint is used). DST ending in .pth or .pt gets a
plain torch state_dict, which `torch_reference.models.build_model(config).load_state_dict` (and,
for VGG16 and AlexNet, torchvision's own model) accepts; any other DST becomes a checkpoint
folder of the other backend: a torch one from JAX, a JAX (orbax) one from torch.
A converted folder holds the weights and the meta, not the optimiser state: `predict.py` uses it,
`--resume` refuses it. The weights go through `jaxvision.interop.convert`'s tables, the ones the
parity tests check.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from jaxvision.apps import backends
from jaxvision.core import flags, results
from jaxvision.core.archs import get_arch
from jaxvision.core.errors import UserError, exit_code, writing
from torch_reference.checkpoint import save_state_dict


def export(src: str | Path, dst: str | Path) -> Path:
    source, path, meta = backends.for_checkpoint(src)
    arch = get_arch(meta["arch"])
    if arch.flax_model is None or arch.torch_model is None:  # the registry allows a lone backend
        raise UserError(f"{path} holds a {arch.name} model, which exists in one framework only; "
                        "there is nothing to convert it to")  # fmt: skip
    dst = Path(dst)
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):  # only an empty folder
        raise UserError(f"{dst} already exists; give a new path")
    if dst.resolve().is_relative_to(path.parent.resolve()):  # a step there would be "damaged"
        raise UserError(f"DST {dst} is inside {path.parent}, the checkpoint folder being "
                        "converted; give a path outside it")  # fmt: skip
    if dst.suffix.lower() in (".pth", ".pt"):
        results.probe_writable_file(dst, "DST")
    else:
        results.probe_writable(dst, "DST")
    with _removed_if_unfinished(dst), writing(dst, "free disk space, or give another DST"):
        state_dict = source.torch_state_dict(source.load_model(path, meta))
        if dst.suffix.lower() in (".pth", ".pt"):
            return save_state_dict(state_dict, dst)
        meta = {**meta, "items": ["model", "meta"], "converted_from": str(path)}
        return backends.other(source.name).write_weights(dst, int(path.name), state_dict, meta)


@contextlib.contextmanager
def _removed_if_unfinished(dst: Path) -> Iterator[None]:
    """Whatever a write that fails, or is interrupted, leaves at `dst` (a new path, or an empty
    folder: `export` checks) is removed, so that the same command can run again."""
    existed = dst.exists()
    try:
        yield
    except BaseException:
        if dst.is_dir():
            for leftover in dst.iterdir() if existed else [dst]:
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        elif dst.exists():
            dst.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = flags.Parser(
        prog="convert_checkpoint.py",
        description="Convert a checkpoint's weights to the other framework: JAX -> torch "
        "(a .pth state_dict or a checkpoint folder), torch -> JAX (an orbax checkpoint folder).",
    )
    p.add_argument("src", metavar="SRC", help="a --checkpoint-dir that train.py wrote (its latest "
                   "checkpoint), or one checkpoint's folder in it, DIR/<step>")  # fmt: skip
    p.add_argument("dst", metavar="DST", help="model.pth, or a new folder")
    args = p.parse_args(argv)
    return exit_code(lambda: print(f"wrote {export(args.src, args.dst)}"))
