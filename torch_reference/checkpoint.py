"""The torch backend's checkpoints: `jaxvision.core.checkpoint`'s layout, written with `torch.save`.

DIR/<step>/state.pt holds the model's and optimiser's state_dicts, the lr scheduler's, and the RNG
states (torch's global generator, which drives dropout, CUDA's, and the augmentation generator);
DIR/<step>/meta.json the same meta as the JAX backend's. A checkpoint is written into a hidden
temporary folder, flushed to disk, and renamed to DIR/<step> only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from jaxvision.core.archs import config_from_dict
from jaxvision.core.checkpoint import (
    KEEP,
    TORCH_META,
    TORCH_STATE,
    Checkpoints,
    check_fits,
    check_meta,
    damaged_if_not_finite,
    fsync,
    write_manifest,
)
from jaxvision.core.errors import DamagedCheckpoint, UserError
from torch_reference.models import build_model

TMP_PREFIX = ".tmp-"


class TorchCheckpoints(Checkpoints):
    @staticmethod
    def read_meta(path: Path) -> dict:
        try:
            meta = json.loads((path / TORCH_META).read_text())
        except (OSError, ValueError) as e:
            raise DamagedCheckpoint(f"cannot read {path / TORCH_META} ({e})") from None
        return check_meta(meta, path)

    def __init__(self, config, data, model_cfg, trainer):
        super().__init__(config, data, model_cfg, trainer.steps)
        self.trainer = trainer
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(TMP_PREFIX + "*"):  # a save that was killed
            shutil.rmtree(stale, ignore_errors=True)

    def _state(self) -> dict:
        t = self.trainer
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rng["augment"] = t.generator.get_state()
        return {
            "model": t.model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict() if t.scheduler is not None else None,
            "rng": rng,
        }

    def _write(self, step: int, meta: dict) -> None:
        write_folder(self.directory, step, self._state(), {**meta, "items": ["model", "train",
                                                                            "meta"]})  # fmt: skip
        for old in self._steps()[:-KEEP]:
            shutil.rmtree(self.path(old))

    def _partial(self, step: int) -> list[Path]:
        return list(self.directory.glob(f"{TMP_PREFIX}{step}-*"))

    def _restore(self, step: int) -> None:
        t = self.trainer
        state = load_state(self.path(step))
        optimizer = {f"optimizer/{i}/{k}": v for i, slots in state["optimizer"]["state"].items()
                     for k, v in slots.items() if isinstance(v, torch.Tensor)}  # fmt: skip
        check_finite({**state["model"], **optimizer}, self.path(step))
        saved = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        if saved != [len(g["params"]) for g in t.optimizer.param_groups]:
            raise UserError(
                f"{self.path(step)}'s optimiser has other parameter groups than this version "
                "builds (an AdamW decay mask or --unfreeze added since); start a new run from "
                "its weights (scripts/convert_checkpoint.py), or resume with the version that "
                "wrote it"
            )
        check_model_fits(state["model"], t.model, self.path(step), self.config.arch)
        # moments shaped as their parameters (torch would find out at the first step)
        shapes = [p.shape for group in t.optimizer.param_groups for p in group["params"]]
        moments = {
            k: (int(k.split("/")[1]), tuple(v.shape)) for k, v in optimizer.items() if v.ndim
        }
        check_fits({k: shape for k, (_, shape) in moments.items()},
                   {k: tuple(shapes[i]) for k, (i, _) in moments.items() if i < len(shapes)},
                   self.path(step), "optimiser state", self.config.arch)  # fmt: skip
        t.model.load_state_dict(state["model"])
        # The saved state (moments, step counts), with this run's settings: torch would restore
        # the checkpoint's --lr, --weight-decay and --momentum, and the schedule's base lrs,
        # where the JAX side builds them from the run's config (a changed --lr or --epochs).
        settings = [{k: v for k, v in g.items() if k != "params"} for g in t.optimizer.param_groups]
        t.optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(t.optimizer.param_groups, settings, strict=True):
            group.update(own)
        if t.scheduler is not None:
            t.scheduler.load_state_dict(state["scheduler"])
            t.scheduler.base_lrs = [g["initial_lr"] for g in settings]
            for group, base, f in zip(t.optimizer.param_groups, t.scheduler.base_lrs,
                                      t.scheduler.lr_lambdas, strict=True):  # fmt: skip
                group["lr"] = base * f(t.scheduler.last_epoch)
            t.scheduler._last_lr = [g["lr"] for g in t.optimizer.param_groups]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "augment" in rng:
            t.generator.set_state(rng["augment"])


def write_folder(directory: Path, step: int, state: dict, meta: dict) -> Path:
    """DIR/<step>/{state.pt, meta.json}, atomically: written in a temporary folder, flushed,
    then renamed, so the checkpoint appears whole or not at all."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{TMP_PREFIX}{step}-{os.getpid()}"
    tmp.mkdir()
    torch.save(state, tmp / TORCH_STATE)
    (tmp / TORCH_META).write_text(json.dumps(meta, indent=1) + "\n")
    for f in (tmp / TORCH_STATE, tmp / TORCH_META):
        fsync(f)
    write_manifest(tmp)  # last: it seals the folder
    os.rename(tmp, directory / str(step))
    fsync(directory)
    return directory / str(step)


def save_state_dict(state_dict: dict, path: Path) -> Path:
    """A plain torch state_dict file (model.pth), which `load_state_dict` takes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return path


def load_model(path: Path, meta: dict) -> torch.nn.Module:
    """The torch model in checkpoint folder `path` (DIR/<step>), in eval mode."""
    pretrained = meta["config"].get("pretrained", False)  # the detector's frozen batch norm
    model = build_model(config_from_dict(meta["arch"], meta["model_config"]), pretrained)
    state = load_state(path)["model"]
    check_finite(state, path)
    check_model_fits(state, model, path, meta["arch"])
    model.load_state_dict(state)
    return model.eval()


def check_model_fits(state_dict: dict, model: torch.nn.Module, path: Path, arch: str) -> None:
    """`check_fits`: one line, not torch's load_state_dict error, for checkpoint `path`'s model
    weights that this version's `arch` model does not take."""
    saved = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_fits(saved, wanted, path, "model", arch)


def check_finite(state_dict: dict, path: Path) -> None:
    """DamagedCheckpoint when a floating-point tensor of `state_dict` holds NaN or inf."""
    damaged_if_not_finite(
        [k for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all()],
        path,
    )


def load_state(path: Path) -> dict:
    """DIR/<step>/state.pt, on the CPU; a clear error when it cannot be read."""
    try:
        return torch.load(path / TORCH_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (unpickling damaged bytes raises anything)
        raise DamagedCheckpoint(f"cannot read checkpoint {path / TORCH_STATE} "
                                f"({type(e).__name__}: {e}); use an older checkpoint folder"
                                ) from None  # fmt: skip
