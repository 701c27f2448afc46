"""torchvision's pretrained weights: ImageNet for VGG16 and AlexNet, COCO for Faster R-CNN.

Found, loaded, and (VGG16, AlexNet) converted to Flax and cached.

Where the weights come from, in order:
  1. `--weights PATH`, a torchvision state_dict saved with `torch.save`;
  2. torch hub's cache (`$TORCH_HOME/hub/checkpoints/`, default `~/.cache/torch/hub/checkpoints/`),
     where torchvision keeps what it downloads;
  3. a download from torchvision's URL, but only after a 3-second reachability check, so that an
     offline machine gets one clear line (where the file is expected, how to get it, and that
     `--no-pretrained` trains from random weights) instead of a hang or a urllib traceback.
The JAX backend converts the state_dict (`jaxvision.convert`) and caches the converted parameters
as `.npz` beside it, keyed by the source file's name and size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxvision.data import host_reachable
from jaxvision.errors import UserError

WEIGHTS = {  # arch (faster_rcnn: "faster_rcnn/<detector>") -> torchvision weights enum entry
    "vgg16": "VGG16_Weights.IMAGENET1K_V1",
    "alexnet": "AlexNet_Weights.IMAGENET1K_V1",
    "faster_rcnn/mobilenet_v3_320": "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1",
    "faster_rcnn/resnet50_fpn": "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
}


def weights_name(arch: str, preset: str | None = None) -> str:
    """The key of `WEIGHTS` for an arch and preset (Faster R-CNN: one per --detector)."""
    from jaxvision.configs import DEFAULT_PRESET

    return f"{arch}/{preset or DEFAULT_PRESET[arch]}" if arch == "faster_rcnn" else arch


def weights_url(arch: str) -> str:
    from torchvision.models import get_weight

    return get_weight(WEIGHTS[arch]).url


def hub_checkpoint_path(arch: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_url(arch)).name


def find_weights(arch: str, weights: str | os.PathLike | None = None) -> Path:
    """The local file holding `arch`'s pretrained weights, downloading it only if reachable."""
    if arch not in WEIGHTS:
        have = ", ".join(sorted({k.split("/")[0] for k in WEIGHTS}))
        raise UserError(f"--pretrained: torchvision has no weights for {arch} (it has for {have})")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"--weights {path} does not exist")
        return path
    path = hub_checkpoint_path(arch)
    if path.is_file():
        return path
    url = weights_url(arch)
    if not host_reachable(url):
        raise UserError(
            f"no pretrained {arch} weights: expected {path} (torch hub's cache) and {url} is "
            f"unreachable; download that file to {path.parent}/ or pass --weights PATH, or use "
            f"--no-pretrained to train from random weights"
        )
    import torch

    torch.hub.load_state_dict_from_url(url, progress=True)
    return path


def load_state_dict(path: Path) -> dict:
    import torch

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, a pickle of something else, ...
        raise UserError(
            f"{path}: not a readable torch state_dict ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: holds a {type(state_dict).__name__}, not a state_dict")
    return state_dict


def cache_path(source: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    root = Path(cache_dir or os.environ.get("JAXVISION_CACHE", "~/.cache/jaxvision")).expanduser()
    return root / f"{source.stem}-{source.stat().st_size}-flax.npz"


def load_into_flax(model, arch: str, weights=None, cache_dir=None, verbose: bool = True) -> Path:
    """Writes torchvision's pretrained weights into the Flax `model` (1000 classes), in place."""
    from flax import nnx

    from jaxvision import convert

    source = find_weights(arch, weights)
    cached = cache_path(source, cache_dir)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    if cached.is_file():
        with np.load(cached) as npz:
            arrays = {
                tuple(int(p) if p.isdigit() else p for p in k.split("/")): npz[k] for k in npz
            }
        if set(arrays) != set(params):
            raise UserError(f"{cached}: converted cache does not match the model; delete it")
        for path, value in arrays.items():
            params[path].set_value(value)
        origin = f"{source} (converted cache {cached})"
    else:
        convert.load_torch_state_dict(model, load_state_dict(source))
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, **{"/".join(map(str, p)): np.asarray(v[...]) for p, v in params.items()})
        tmp.replace(cached)  # never leave a half-written cache behind
        origin = f"{source} (converted, cached at {cached})"
    if verbose:
        print(f"pretrained {arch} weights: {origin}")
    return source


def load_into_torch(model, arch: str, weights=None, verbose: bool = True) -> Path:
    source = find_weights(arch, weights)
    try:
        model.load_state_dict(load_state_dict(source), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{source}: does not fit torchvision's {arch} ({first})") from None
    if verbose:
        print(f"pretrained {arch} weights: {source}")
    return source
