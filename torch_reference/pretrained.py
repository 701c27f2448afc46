"""torchvision's pretrained weights: ImageNet for VGG16 and AlexNet, COCO for Faster R-CNN.

Where the weights come from, in order:
  1. `--weights PATH`, a torchvision state_dict saved with `torch.save`;
  2. torch hub's cache (`$TORCH_HOME/hub/checkpoints/`, default `~/.cache/torch/hub/checkpoints/`),
     where torchvision keeps what it downloads;
  3. a download from torchvision's URL, but only after a 3-second reachability check, so that an
     offline machine gets one clear line (where the file is expected, how to get it, and that
     `--no-pretrained` trains from random weights) instead of a hang or a urllib traceback.
Which weights each arch has is the arch registry's (`jaxvision.core.archs`). The JAX backend
converts them to Flax (`jaxvision.interop.pretrained`).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from torchvision.models import get_weight

from jaxvision.core.archs import ARCHS, get_arch
from jaxvision.core.data import host_reachable
from jaxvision.core.errors import UserError


def weights_name(arch: str, preset: str | None = None) -> str:
    """How an arch's (and preset's) weights are named: 'vgg16', 'faster_rcnn/<detector>'."""
    return get_arch(arch).weights_name(preset)


def weights_entry(name: str) -> str | None:
    """torchvision's weights enum entry for a weights name, or None when it has none."""
    arch, _, preset = name.partition("/")
    return get_arch(arch).weights_entry(preset or None) if arch in ARCHS else None


def weights_url(name: str) -> str:
    return get_weight(weights_entry(name)).url


def hub_checkpoint_path(arch: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_url(arch)).name


def find_weights(arch: str, weights: str | os.PathLike | None = None) -> Path:
    """The local file holding `arch`'s pretrained weights, downloading it only if reachable."""
    if weights_entry(arch) is None:
        have = ", ".join(sorted(a.name for a in ARCHS.values() if a.pretrained))
        raise UserError(f"--pretrained: torchvision has no weights for {arch} (it has for {have})")
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            raise UserError(f"--weights {path} is a folder; pass the .pth file in it")
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
    torch.hub.load_state_dict_from_url(url, progress=True)
    return path


def load_state_dict(path: Path) -> dict:
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols before it fails
            warnings.simplefilter("ignore", UserWarning)
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # junk bytes, or objects other than tensors
        # torch's own message runs to a page and advises weights_only=False: only its reason
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        reason = found.group(1).split(". ")[0].strip() if found else "not a weights file"
        raise UserError(
            f"{path}: not a readable torch state_dict (weights-only loading refused it: "
            f"{reason}); download it again, or pass a torchvision .pth"
        ) from None
    except Exception as e:  # a truncated download, a zip of something else, ...
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(
            f"{path}: not a readable torch state_dict ({type(e).__name__}: {first}); download it "
            "again, or pass a torchvision .pth"
        ) from None
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: holds a {type(state_dict).__name__}, not a state_dict")
    return state_dict


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
