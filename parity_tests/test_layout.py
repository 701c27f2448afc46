"""The layout's rules, checked: the import contract, framework-free layers in a fresh interpreter,
no lazy imports but the documented ones, one registry for backends and one for archs, and ruff."""

import ast
import dataclasses
import json
import pkgutil
import subprocess
import sys

import pytest

import jaxvision.core
import torch_reference
from jaxvision.apps import backends
from jaxvision.core import archs, flags
from jaxvision.core.archs import ARCHS
from jaxvision.core.config import TrainConfig
from jaxvision.core.recipes import RECIPE_FIELDS, Recipe

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "jaxvision").rglob("*.py"), *(REPO / "torch_reference").rglob("*.py")])
JAX = ("jax", "jaxlib", "flax", "optax", "orbax")
TORCH = ("torch", "torchvision")


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)  # fmt: skip


def modules(package) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


def test_import_contract_is_kept():
    r = run("-c", "import sys; from importlinter.cli import lint_imports_command as c; "
            "sys.argv = ['lint-imports', '--no-cache']; c()")  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and "5 kept" in r.stdout, r.stdout[-2000:]


def loaded_after_each_import(names: list[str]) -> dict[str, list[str]]:
    """Imports each module in turn in one fresh interpreter; returns, per module, the framework
    packages (JAX's and torch's) in sys.modules right after it."""
    code = (
        "import importlib, json, sys\n"
        f"watch = {JAX + TORCH!r}\n"
        "out = {}\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    out[name] = [w for w in watch if w in sys.modules]\n"
        "print(json.dumps(out))\n"
    )
    r = run("-c", code)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_the_core_imports_neither_jax_nor_torch():
    names = modules(jaxvision.core)
    assert {"jaxvision.core.config", "jaxvision.core.data", "jaxvision.core.loop"} <= set(names)
    loaded = loaded_after_each_import(names)
    assert loaded == {name: [] for name in names}


def test_the_torch_side_imports_no_jax():
    names = [*modules(torch_reference), "jaxvision.apps.torch_backend"]
    loaded = loaded_after_each_import(names)
    assert all(not set(JAX) & set(v) for v in loaded.values()), loaded
    assert "torch" in loaded[names[-1]]


def test_the_jax_backend_loads_torch_only_when_it_needs_it():
    loaded = loaded_after_each_import(["jaxvision.apps.jax_backend", "jaxvision.apps.train"])
    assert all(not set(TORCH) & set(v) for v in loaded.values()), loaded
    assert "jax" in loaded["jaxvision.apps.jax_backend"]


# Imports inside functions: only these, each a heavy optional dependency whose use is rare.
LAZY = {
    "matplotlib", "matplotlib.pyplot", "matplotlib.ticker",  # drawing (attention, report)
    "tensorflow_datasets", "tensorflow", "absl.logging",  # TFDS, only with --data-source tfds
    "jaxvision.interop", "torch_reference.checkpoint",  # torch, in a JAX run: pretrained, export
    "torch_reference.pretrained",  # torch, in run_lab.py: whether each run's weights are on disk
}  # fmt: skip


def test_imports_are_at_the_top_except_documented_lazy_ones():
    found = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for n in ast.walk(node):
                    if isinstance(n, ast.Import):
                        found |= {(a.name, path.name) for a in n.names}
                    elif isinstance(n, ast.ImportFrom):
                        found.add((n.module, path.name))
    assert {m for m, _ in found} <= LAZY, sorted(found)


def test_backends_are_chosen_by_name_only_in_the_registry():
    """No `backend == "jax"`, `name in ("jax", "torch")` and the like outside
    jaxvision/apps/backends.py: apps ask the registry for a backend object instead."""
    names = set(backends.REGISTRY)
    offenders = []
    for path in SOURCES:
        if path.name == "backends.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant)]
                if any(c.value in names for c in consts):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


ENTRIES = [f.name for f in dataclasses.fields(archs.Arch)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_has_every_entry_and_each_resolves(arch):
    a = ARCHS[arch]
    assert a.name == arch and a.summary
    for entry in ("flax_model", "torch_model", "conversion", "pretrained"):
        assert entry in ENTRIES  # an explicit value, None where the arch has none
    assert a.presets and a.default_preset in a.presets
    assert all(isinstance(c, a.config) for c in a.presets.values())
    assert {"default", "lab-cpu", "lab-pretrained"} <= set(a.recipes)
    assert all(isinstance(r, Recipe) for r in a.recipes.values())
    torch_model = a.load("torch_model")
    assert callable(torch_model)
    if a.flax_model is not None:  # the twins carry one name; a conversion table joins them
        # torch's detector is torchvision's builder, which returns its FasterRCNN
        twin = "FasterRCNN" if a.detector else torch_model.__name__
        assert a.load("flax_model").__name__ == twin
        assert callable(a.load("conversion"))
    else:
        assert a.conversion is None and a.backends == ("torch",)
    if a.pretrained is not None:
        assert all(p in a.presets for p in a.pretrained) or len(a.pretrained) == 1
        assert a.weights_entry(a.default_preset).endswith(("IMAGENET1K_V1", "COCO_V1"))


def test_a_bare_config_is_its_archs_default_recipe():
    for name, a in ARCHS.items():
        config = TrainConfig(arch=name, backend=a.backends[0])
        recipe = dataclasses.asdict(a.recipe())
        # The recipe's values, but for those this run does not use, which are None.
        unused = {f for f in RECIPE_FIELDS if getattr(config, f) is None and recipe[f] is not None}
        assert unused <= {"momentum", "warmup_epochs", "feature_lr", "scan"}, (name, unused)
        assert {f: getattr(config, f) for f in RECIPE_FIELDS if f not in unused} == {
            f: v for f, v in recipe.items() if f not in unused
        }
    vit = TrainConfig(arch="vit")
    assert (vit.optimizer, vit.schedule, vit.augment, vit.scan) == ("adamw", "cosine", True, True)
    lab = TrainConfig.for_arch("vgg16", "lab-cpu", epochs=1)
    assert (lab.epochs, lab.image_size, lab.pretrained, lab.unfreeze) == (1, 32, False, True)
    with pytest.raises(Exception, match="unknown --recipe 'fast' for cnn"):
        TrainConfig(recipe="fast")


def test_every_config_field_with_help_is_a_flag_with_its_default_shown():
    from jaxvision.apps.train import build_parser

    text = build_parser().format_help()
    not_flags = []
    for f in dataclasses.fields(TrainConfig):
        if flags.KEY not in f.metadata:
            not_flags.append(f.name)
            continue
        assert "--" + f.name.replace("_", "-") in text, f.name  # one declaration, one flag
    assert not_flags == ["notes"]  # what __post_init__ adjusted, not a setting
    flat = " ".join(text.split())
    assert "[cnn: 40, vit: 150, vgg16: 3, alexnet: 3, faster_rcnn: 3]" in flat
    assert "[vgg16: 224, alexnet: 224, faster_rcnn: 64]" in flat  # not cnn's "None"
    args = build_parser().parse_args(["--arch", "vit", "--no-augment", "--head-lr", "0.01"])
    assert flags.values(args, TrainConfig) == {"arch": "vit", "augment": False, "lr": 0.01}


def test_ruff_check_and_format():
    for args in (["check", "."], ["format", "--check", "."]):
        r = run("-m", "ruff", *args)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
