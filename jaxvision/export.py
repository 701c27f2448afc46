"""`convert_checkpoint.py SRC DST`: move a trained model between frameworks.

SRC is a `--checkpoint-dir` (its latest checkpoint is used):
  * from the JAX backend: DST ending in .pth or .pt gets a plain torch state_dict, which
    `torch_reference.models.build_model(config).load_state_dict` (and, for VGG16 and AlexNet,
    torchvision's own model) accepts; any other DST becomes a torch checkpoint folder;
  * from the torch backend: DST becomes a JAX (orbax) checkpoint folder.
A converted folder holds the weights and the meta, not the optimiser state: `predict.py` uses it,
`--resume` refuses it. The weights go through `jaxvision.convert`'s tables, the ones the parity
tests check.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxvision import checkpoint, configs
from jaxvision.errors import UserError, exit_code


def export(src: str | Path, dst: str | Path) -> Path:
    path, meta = checkpoint.read_meta(src)
    if meta["arch"] in configs.TORCH_ONLY_ARCHS:
        raise UserError(f"{path} holds a {meta['arch']} detector, which has no JAX model; "
                        "only cnn, vit, vgg16 and alexnet convert")  # fmt: skip
    dst = Path(dst)
    if dst.exists() and (dst.is_file() or any(dst.iterdir())):
        raise UserError(f"{dst} already exists; give a new path")
    step = int(path.name)
    meta = {**meta, "items": ["model", "meta"], "converted_from": str(path)}
    if meta["backend"] == "jax":
        import torch

        from jaxvision import convert
        from torch_reference.checkpoint import write_folder

        state_dict = convert.to_torch_state_dict(checkpoint.load_flax_model(path, meta))
        if dst.suffix in (".pth", ".pt"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state_dict, dst)
            return dst
        return write_folder(dst, step, {"model": state_dict}, {**meta, "backend": "torch"})
    if dst.suffix in (".pth", ".pt"):
        raise UserError(f"{path} is already a torch checkpoint (its state.pt holds the "
                        "state_dict); give a folder to convert it to JAX")  # fmt: skip
    from flax import nnx

    from jaxvision import convert
    from jaxvision.models import build_model
    from torch_reference.checkpoint import load_state

    model = build_model(configs.config_from_dict(meta["arch"], meta["model_config"]),
                        rngs=nnx.Rngs(0))  # fmt: skip
    convert.load_torch_state_dict(model, load_state(path)["model"])
    manager = checkpoint.JaxCheckpoints.open(dst)
    manager.save(step, checkpoint.to_nested(nnx.state(model)), None, {**meta, "backend": "jax"})
    return dst / str(step)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert a checkpoint's weights to the other framework: JAX -> torch "
        "(a .pth state_dict or a checkpoint folder), torch -> JAX (an orbax checkpoint folder).",
    )
    p.add_argument("src", metavar="SRC", help="a --checkpoint-dir that train.py wrote")
    p.add_argument("dst", metavar="DST", help="model.pth, or a new folder")
    args = p.parse_args(argv)
    return exit_code(lambda: print(f"wrote {export(args.src, args.dst)}"))
