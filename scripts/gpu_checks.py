"""The Python half of scripts/gpu_checks.sh (run it through that script, not alone).

    python scripts/gpu_checks.py env                # what the machine is; exit 3 without a GPU
    python scripts/gpu_checks.py det WORK           # compare the --deterministic pairs
    python scripts/gpu_checks.py summary WORK OUT   # WORK's results -> OUT/summary.md, bench.json

`summary` reads only what the steps wrote (JSON, logs), so it is cheap enough to run after every
step: whatever the run finishes, $OUT holds it, even if a later step is killed.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

DET_RUNS = [(arch, backend) for arch in ("cnn", "vit") for backend in ("jax", "torch")]
# Time to accuracy: the target for each arch, and two lower marks read off its history.
TTA_MARKS = {"cnn": (0.98, 0.985, 0.99), "vit": (0.97, 0.98, 0.985)}


def env(require_gpu: bool) -> int:
    """Starts JAX under the project's own default XLA_FLAGS (an XLA that does not know one of
    them aborts here, not in the first timed step), then torch; prints what each sees."""
    from jaxvision.apps.jax_backend import use_default_xla_flags
    from jaxvision.core.archs import get_arch

    use_default_xla_flags(get_arch("cnn"))
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    import jax
    import jax.numpy as jnp

    devices = jax.devices()
    x = jnp.ones((512, 512))
    print(f"jax {jax.__version__}: {devices}; a matmul gives {float((x @ x)[0, 0])}")
    import torch

    cuda = torch.cuda.is_available()
    line = f"torch {torch.__version__}: cuda {cuda}"
    tf32 = False
    if cuda:
        major, minor = torch.cuda.get_device_capability(0)
        tf32 = major >= 8  # TF32 matrix units: Ampere (8.0) and later
        line += f", {torch.cuda.get_device_name(0)}, compute capability {major}.{minor}"
    print(line)
    if cuda:
        print(f"float32 matmuls on the GPU: {'TF32 in both backends' if tf32 else 'float32'}")
    if require_gpu and not (devices[0].platform == "gpu" and cuda):
        print(
            "error: JAX or torch sees no GPU on this machine; the GPU checks stop here "
            "(QUICK=1 rehearses them on a CPU)",
            file=sys.stderr,
        )
        return 3
    return 0


def det(work: Path) -> int:
    """Each --deterministic pair: the same weights bit for bit, the same training losses and
    confusion matrix. Writes det.json beside the runs."""
    import torch

    rows, ok = [], True
    for arch, backend in DET_RUNS:
        runs = [work / f"det-{arch}-{backend}-{r}" for r in (1, 2)]
        missing = [r.name for r in runs if not (r / "metrics.json").exists()]
        if missing:
            rows.append({"arch": arch, "backend": backend, "error": f"no result: {missing}"})
            ok = False
            continue
        try:
            a, b = (torch.load(r / "model.pth", map_location="cpu") for r in runs)
        except Exception as e:  # noqa: BLE001 - a missing or cut-short file is a row, not a crash
            rows.append({"arch": arch, "backend": backend, "error": f"model.pth: {e}"[:120]})
            ok = False
            continue
        weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        m = [json.loads((r / "metrics.json").read_text()) for r in runs]
        losses = [[h["train_loss"] for h in x["history"]] for x in m]
        same = losses[0] == losses[1] and m[0]["confusion_matrix"] == m[1]["confusion_matrix"]
        rows.append(
            {
                "arch": arch,
                "backend": backend,
                "weights_identical": weights,
                "losses_and_confusion_identical": same,
                "device": m[0]["device"],
            }
        )
        ok &= weights and same
        print(
            f"{arch} / {backend}: weights {'identical' if weights else 'DIFFER'}, "
            f"training losses and confusion matrix {'identical' if same else 'DIFFER'}"
        )
    (work / "det.json").write_text(json.dumps(rows, indent=1))
    return 0 if ok else 1


def _metrics(work: Path, name: str) -> dict | None:
    path = work / name / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def _table(title: str, header: tuple, rows: list) -> str:
    if not rows:
        return ""
    lines = [f"## {title}", "", f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    return "\n".join(lines + [f"| {' | '.join(map(str, r))} |" for r in rows]) + "\n"


def _epochs(work: Path) -> str:
    rows = []
    for d in sorted(work.glob("epoch-*")):
        if (m := _metrics(work, d.name)) is None:
            continue
        per_epoch = [h["train_time_s"] + h["eval_time_s"] for h in m["history"]]
        later = per_epoch[1:]  # the first epoch pays for compilation and autotuning
        rows.append(
            (
                m["backend"],
                m["batch_size"],
                f"{per_epoch[0]:.3f} s",
                f"{min(later):.3f} s" if later else "–",
                f"{m['test_accuracy']:.2%}",
                m["device"],
            )
        )
    return _table(
        "The CNN: one epoch over 60,000 synthetic images of MNIST's shape + evaluation on 10,000",
        (
            "backend",
            "batch",
            "first epoch",
            "best later epoch (train + eval)",
            "accuracy (synthetic)",
            "device",
        ),
        rows,
    )


EPOCH_LINE = re.compile(
    r"epoch (\d+)/\d+: train loss \S+ \| test loss \S+ \| test acc ([\d.]+)% .*\| ([\d.]+) s"
)


def _tta_row(work: Path, arch: str, backend: str, marks: tuple) -> tuple | None:
    """From metrics.json: the train + eval seconds to each mark (`results.time_to_target`, the
    figure train.py records). From the log's epoch lines if the step's limit cut the run (no
    metrics.json): training seconds only, marked so."""
    from jaxvision.core.results import EpochStats, time_to_target

    name = f"tta-{arch}-{backend}"
    if (m := _metrics(work, name)) is not None:
        keys = ("epoch", "train_loss", "test_loss", "test_accuracy", "test_f1_macro",
                "train_time_s", "eval_time_s")  # fmt: skip
        history = [EpochStats(*(h.get(k) for k in keys)) for h in m["history"]]
        last, compile_s, device = m["test_accuracy"], f"{m['compile_time_s']:.1f} s", m["device"]
        fmt = "{1:.1f} s (ep {0})"
    elif (log := work / f"{name}.log").exists():
        history = [
            EpochStats(int(epoch), 0.0, None, float(acc) / 100, None, float(train_s), 0.0)
            for epoch, acc, train_s in EPOCH_LINE.findall(log.read_text())
        ]
        if not history:
            return None
        last, compile_s, device = history[-1].test_accuracy, "cut at the step's limit", "(log)"
        fmt = "{1:.1f} s of training, eval not logged (ep {0})"
    else:
        return None
    hits = [time_to_target(history, mark) for mark in marks]
    cells = [fmt.format(*hit) if hit else "not reached" for hit in hits]
    return (arch, backend, *cells, f"{last:.2%}", compile_s, device)


def _tta(work: Path) -> str:
    rows = [
        row
        for arch, marks in TTA_MARKS.items()
        for backend in ("jax", "torch")
        if (row := _tta_row(work, arch, backend, marks)) is not None
    ]
    header = ("arch", "backend", "1st mark", "2nd mark", "target", "last accuracy", "compile",
              "device")  # fmt: skip
    marks = "; ".join(f"{a}: " + " / ".join(f"{x:.1%}" for x in v) for a, v in TTA_MARKS.items())
    return _table(
        "Time to accuracy, train + eval (MNIST's official test set; 5,000 training digits; "
        f"marks {marks})",
        header,
        rows,
    )


def _det(work: Path) -> str:
    path = work / "det.json"
    if not path.exists():
        return ""
    rows = [
        (
            r["arch"],
            r["backend"],
            r.get("error") or ("yes" if r["weights_identical"] else "NO"),
            "" if "error" in r else ("yes" if r["losses_and_confusion_identical"] else "NO"),
        )
        for r in json.loads(path.read_text())
    ]
    return _table(
        "--deterministic: each run twice",
        ("arch", "backend", "weights bit-identical", "losses and confusion matrix identical"),
        rows,
    )


def _bench(work: Path, out: Path) -> str:
    records = [r for path in work.glob("bench*.json") for r in json.loads(path.read_text())]
    if not records:
        return ""
    order = ("cnn", "vit", "vgg16", "alexnet", "faster_rcnn", "jax", "torch", "torch-compile")
    records.sort(key=lambda r: tuple(order.index(k) if k in order else 9 for k in
                                     (r["arch"], r["backend"])))  # fmt: skip
    measured = [r for r in records if "device" in r]
    if measured:  # one peak for every run on this machine: the fastest matmul any worker timed
        peak = max(r["matmul_flops_per_s"] for r in measured)
        for r in measured:
            r["peak_flops_per_s"] = peak
            r["fraction_of_peak"] = r["flops_per_image"] * r["train_images_per_s"] / peak
    (out / "bench.json").write_text(json.dumps(records, indent=1))
    from jaxvision.apps.benchmark import markdown

    return "## scripts/benchmark.py\n\n" + markdown(records)


def _logs(work: Path) -> str:
    parts = []
    for name in ("lab", "compat"):
        log = work / f"{name}.log"
        if log.exists():
            parts.append(f"## {name} (end of its log)\n\n```\n{log.read_text()[-3000:]}\n```\n")
    return "\n".join(parts)


def summary(work: Path, out: Path) -> int:
    steps = work / "steps.md"
    text = [
        "# GPU checks (scripts/gpu_checks.sh)",
        "",
        "| step | result |",
        "|---|---|",
        steps.read_text() if steps.exists() else "",
    ]
    if (work / "env.log").exists():
        env_log = (work / "env.log").read_text()
        if len(env_log) > 4000:  # a fallback's abort message: keep nvidia-smi's lines and the end
            env_log = env_log[:2000] + "\n[...]\n" + env_log[-2000:]
        text.append(f"## Machine\n\n```\n{env_log}\n```\n")
    if (work / "cores.txt").exists():
        text.append((work / "cores.txt").read_text())
    for section in (_epochs, _tta, _det, lambda w: _bench(w, out), _logs):
        try:  # one broken section (a half-written file) does not cost the others
            text.append(section(work))
        except Exception as e:  # noqa: BLE001
            text.append(f"(a summary section failed: {type(e).__name__}: {e})\n")
    if (work / "rerun.txt").exists():
        text.append("## Not run (the budget)\n\n" + (work / "rerun.txt").read_text())
    (out / "summary.md").write_text("\n".join(t for t in text if t) + "\n")
    lab_png = work / "lab" / "comparison.png"
    if lab_png.exists():
        (out / "lab.png").write_bytes(lab_png.read_bytes())
    subprocess.run(
        [
            "tar",
            "czf",
            str(out / "runs.tgz.part"),
            "--exclude=*.pth",
            "--exclude=checkpoints",
            "-C",
            str(work),
            ".",
        ],
        check=False,
    )
    if (out / "runs.tgz.part").exists():  # whole, or the previous one stays
        os.replace(out / "runs.tgz.part", out / "runs.tgz")
    return 0


def _folders(*paths: str) -> list[Path] | None:
    """`paths` as folders, or None after one error line naming the first that is not one."""
    for p in paths:
        if not Path(p).is_dir():
            print(f"error: {p} is not a folder; give the WORK (and OUT) folder that "
                  "gpu_checks.sh made", file=sys.stderr)  # fmt: skip
            return None
    return [Path(p) for p in paths]


def main(argv: list[str]) -> int:
    if argv[:1] == ["env"]:
        return env(require_gpu=os.environ.get("REQUIRE_GPU", "1") == "1")
    commands = {"det": (det, 1), "summary": (summary, 2)}
    if argv[:1] and argv[0] in commands and len(argv) == 1 + commands[argv[0]][1]:
        folders = _folders(*argv[1:])
        return 2 if folders is None else commands[argv[0]][0](*folders)
    print(f"error: unknown command {' '.join(argv)!r}; see the top of {__file__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
