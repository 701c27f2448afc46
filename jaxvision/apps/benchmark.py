"""Training and inference speed of every arch in every backend, measured side by side.

Each (arch, backend) runs in its own worker process, so that its peak memory is its own and one
framework's threads never share a process with the other's. The workers are set up first
(model, optimiser, compilation, one warm-up epoch and evaluation), then measured in turns,
A B C A B C ..., `--repeats` times; each figure is the median over the repeats. The training
figure is the real training path (`Trainer.train_epoch` of either backend: index-gather, augment
where the recipe does, forward, backward, optimiser step) over `--steps` steps; inference is the
backends' `evaluate` (forward, loss, predictions, metrics) over as many images. Both end on an
explicit synchronisation (`block_until_ready`, `torch.cuda.synchronize`).

FLOPs: `flops_per_image` is the model's training FLOPs (forward + backward of the convolutions
and matmuls) counted by torch's `FlopCounterMode` on one step, the same figure for every backend
of an arch; JAX rows also carry XLA's own count of the whole compiled step
(`xla_flops_per_image`, which includes elementwise work and the optimiser). `fraction_of_peak` is
achieved training FLOP/s over the machine's peak, measured in the same run as the fastest large
float32 matmul of either framework.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
from pathlib import Path

import numpy as np

from jaxvision.apps import backends
from jaxvision.core import data, flags
from jaxvision.core.archs import ARCHS, get_arch
from jaxvision.core.bench import peak_host_mb
from jaxvision.core.config import BACKEND_NAMES, MAX_INT, TrainConfig
from jaxvision.core.errors import (
    RunFailed,
    UserError,
    exit_code,
    failed_allocation,
    writing,
)
from jaxvision.core.results import describe_host, probe_writable_file

BACKENDS = tuple(backends.REGISTRY)
RECORD_KEYS = (
    "arch",
    "backend",
    "device",
    "batch_size",
    "image_size",
    "train_images_per_s",
    "infer_images_per_s",
    "compile_s",
    "peak_host_mb",
    "peak_device_mb",
    "params",
    "flops_per_image",
    "fraction_of_peak",
    "frameworks_loaded",
    "xla_flags",
    "threads",
    "float32_matmuls",
)


@dataclasses.dataclass(frozen=True)
class Spec:
    arch: str
    backend: str
    batch_size: int
    steps: int
    image_size: int | None  # None: the arch's default (VGG16 / AlexNet 224, Faster R-CNN 64)
    preset: str | None = None
    seed: int = 0
    recipe: str = "default"


def train_config(spec: Spec) -> TrainConfig:
    """The arch's default recipe, at the benchmark's batch size, on random weights."""
    arch = get_arch(spec.arch)
    image_size = arch.recipe(spec.recipe).image_size
    if spec.image_size is not None and image_size is not None:
        image_size = spec.image_size
    return TrainConfig.for_arch(
        spec.arch,
        spec.recipe,
        backend=backends.entry(spec.backend).trains,
        preset=spec.preset,
        seed=spec.seed,
        progress=False,
        batch_size=spec.batch_size,
        eval_batch_size=spec.batch_size,
        image_size=image_size,
        pretrained=False,
    )  # epochs: only the schedule's length


def bench_dataset(n: int) -> data.Dataset:
    """`n` real digits (the bundled sample, repeated if needed) as both splits."""
    sample = data.load_dataset("mnist", source="sample-split", verbose=False)
    idx = np.arange(n) % sample.n_train
    x, y = sample.x_train[idx], sample.y_train[idx]
    return data.make_dataset("mnist", "the bundled sample (benchmark)", x, y, x, y, 10)


def model_flops(spec: Spec) -> float:
    """Training FLOPs per image, counted by torch on the arch's torch model (the same figure for
    every backend of an arch)."""
    torch_backend = backends.get("torch")
    config = train_config(dataclasses.replace(spec, backend="torch"))
    return torch_backend.model_flops(config, bench_dataset(spec.batch_size))


FRAMEWORKS = ("jax", "torch", "tensorflow")


def setting(bench) -> dict:
    """What a worker ran under: the frameworks its process loaded (a torch worker holds no JAX,
    so its memory is its own), the XLA flags in force, and its framework's thread count."""
    loaded = sorted({m.partition(".")[0] for m in sys.modules} & set(FRAMEWORKS))
    return {"frameworks_loaded": loaded, "xla_flags": os.environ.get("XLA_FLAGS"),
            "threads": bench.threads(), "float32_matmuls": bench.float32_matmuls()}  # fmt: skip


def _worker(spec: Spec, conn) -> None:
    """One (arch, backend): set up, then answer "run" with (train s, infer s) until "stop"."""
    try:
        backend = backends.get(spec.backend)
        bench = backend.bench(train_config(spec), bench_dataset(spec.batch_size * spec.steps))
        conn.send(("ready", bench.info))
        while conn.recv() == "run":
            conn.send(("times", (bench.train(), bench.infer())))
        # Memory first: the peak matmul's arrays (256 MB each on a GPU) are not the model's.
        memory = (peak_host_mb(), bench.peak_device_mb())
        conn.send(("memory", (*memory, setting(bench), bench.matmul_peak())))
    except Exception as e:  # reported in the table; the other workers go on
        if what := failed_allocation(e):
            message = (f"out of memory: {what}; use a smaller --batch-size ({spec.batch_size}) "
                       f"or --steps ({spec.steps}): the data is batch x steps images")  # fmt: skip
        else:
            first = str(e).splitlines()[0] if str(e) else ""
            message = f"{type(e).__name__}: {first}"
        conn.send(("error", message[:200]))
    finally:
        conn.close()


def _ask(proc, conn, message: str | None = None) -> tuple[str, object]:
    """Sends `message` (if any) to a worker and returns its answer; a worker that died (a crash
    inside XLA or torch, the OOM killer) answers ("error", ...) instead of breaking the run."""
    try:
        if message is not None:
            conn.send(message)
        return conn.recv()
    except (EOFError, OSError):
        proc.join(timeout=10)
        return "error", f"the worker process died (exit code {proc.exitcode})"


def run_benchmark(specs: list[Spec], repeats: int, log=print) -> list[dict]:
    """Measures every spec, interleaved; returns one record per spec (see RECORD_KEYS)."""
    ctx = multiprocessing.get_context("spawn")
    # The workers share one GPU: JAX's must not each take 75% of its memory up front (the
    # peak-memory figure is then what a worker used).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    workers = []
    for spec in specs:  # set up one at a time, so that compilation is not shared out
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(spec, there), daemon=True)
        proc.start()
        there.close()
        kind, payload = _ask(proc, here)
        log(
            f"  set up {spec.arch} / {spec.backend}: "
            + (f"{payload['compile_s']:.1f} s compile/first step" if kind == "ready" else payload)
        )
        workers.append([spec, proc, here, kind, payload, []])
    live = [w for w in workers if w[3] == "ready"]
    for r in range(repeats):
        for w in live:  # A B C, A B C, ...: a noisy moment hits every backend alike
            kind, payload = _ask(w[1], w[2], "run")
            if kind != "times":
                w[3], w[4] = kind, payload
                continue
            w[5].append(payload)
        live = [w for w in live if w[3] == "ready"]
        log(f"  repeat {r + 1}/{repeats} done")
    flops = {}
    records = []
    for spec, proc, conn, kind, payload, times in workers:
        memory, worker_setting = (None, None), {}
        if kind == "ready":
            answer, reply = _ask(proc, conn, "stop")
            if answer == "memory":
                *memory, worker_setting, matmul_flops_per_s = reply
            else:
                kind, payload = answer, reply
        proc.join(timeout=30)
        n = spec.batch_size * spec.steps
        record = {
            "arch": spec.arch,
            "backend": spec.backend,
            "batch_size": spec.batch_size,
            "steps": spec.steps,
            "repeats": len(times),
        }
        if kind != "ready":
            records.append({**record, "error": payload})
            continue
        if spec.arch not in flops:
            flops[spec.arch] = model_flops(spec)
        train_s = statistics.median(t for t, _ in times)
        infer_s = statistics.median(i for _, i in times)
        record.update(
            device=payload["device"],
            image_size=payload["image_size"],
            train_images_per_s=n / train_s,
            infer_images_per_s=n / infer_s,
            compile_s=payload["compile_s"],
            peak_host_mb=memory[0],
            peak_device_mb=memory[1],
            params=payload["params"],
            flops_per_image=flops[spec.arch],
            matmul_flops_per_s=matmul_flops_per_s,
            train_times_s=[t for t, _ in times],
            **worker_setting,
        )
        if "xla_flops_per_image" in payload:
            record["xla_flops_per_image"] = payload["xla_flops_per_image"]
        records.append(record)
    peak = max((r["matmul_flops_per_s"] for r in records if "device" in r), default=None)
    for r in records:
        if "device" in r:
            r["peak_flops_per_s"] = peak
            r["fraction_of_peak"] = r["flops_per_image"] * r["train_images_per_s"] / peak
    return records


def _fmt(value, spec: str, empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def markdown(records: list[dict]) -> str:
    lines = [
        "| arch | backend | device | batch | train img/s | infer img/s | compile / first step "
        "| peak host MB | peak device MB | params | GFLOP/img (train) | of peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['backend']} | failed: {r['error']} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['arch']} | {r['backend']} | {r['device']} | {r['batch_size']} "
            f"| {r['train_images_per_s']:,.0f} | {r['infer_images_per_s']:,.0f} "
            f"| {r['compile_s']:.2f} s | {r['peak_host_mb']:,.0f} "
            f"| {_fmt(r['peak_device_mb'], ',.0f')} | {r['params']:,} "
            f"| {r['flops_per_image'] / 1e9:.4g} | {r['fraction_of_peak']:.1%} |"
        )
    ratios = ratio_rows(records)
    if ratios:
        lines += [
            "",
            "| arch | JAX ÷ torch, train | JAX ÷ torch, infer | JAX ÷ torch-compile, train |",
            "|---|---|---|---|",
        ]
        lines += ratios
    peak = next((r["peak_flops_per_s"] for r in records if "peak_flops_per_s" in r), None)
    if peak:
        lines += [
            "",
            f"Peak: {peak / 1e9:,.0f} GFLOP/s (the fastest float32 matmul of either "
            "framework, measured in this run).",
        ]
    ran = [r for r in records if "threads" in r]
    if ran:
        threads = ", ".join(f"{r['arch']}/{r['backend']} {r['threads']}" for r in ran)
        matmuls = sorted({r["float32_matmuls"] for r in ran})
        lines.append(f"Threads: {threads}.{_jax_flags(ran)} Float32 matmuls in: "
                     f"{', '.join(matmuls)}.")  # fmt: skip
    return "\n".join(lines)


def _jax_flags(ran: list[dict]) -> str:
    """' XLA_FLAGS: ...' of the workers XLA compiled (the records with XLA's FLOP count), each
    arch with its own defaults; '' where there are none."""

    def text(flags):
        return "unset" if flags is None else (f"`{flags}`" if flags else "empty (XLA's own)")

    flags = {r["arch"]: r["xla_flags"] for r in ran if "xla_flops_per_image" in r}
    if len(set(flags.values())) > 1:
        return " XLA_FLAGS: " + ", ".join(f"{a} {text(f)}" for a, f in flags.items()) + "."
    return f" XLA_FLAGS: {text(next(iter(flags.values())))}." if flags else ""


def ratio_rows(records: list[dict]) -> list[str]:
    by = {(r["arch"], r["backend"]): r for r in records if "device" in r}
    rows = []
    for arch in dict.fromkeys(r["arch"] for r in records):
        jax_r = by.get((arch, "jax"))
        if jax_r is None:
            continue

        def ratio(backend, key, jax_r=jax_r, arch=arch):
            other = by.get((arch, backend))
            return "–" if other is None else f"{jax_r[key] / other[key]:.2f}×"

        rows.append(
            f"| {arch} | {ratio('torch', 'train_images_per_s')} "
            f"| {ratio('torch', 'infer_images_per_s')} "
            f"| {ratio('torch-compile', 'train_images_per_s')} |"
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(
        prog="benchmark.py",
        description="Training and inference throughput of each arch in each backend, measured "
        "side by side in one run (interleaved repeats, medians).",
    )  # each help names its default once (ArgumentDefaultsHelpFormatter repeated them)
    p.add_argument("--archs", default="cnn,vit",
                   help=f"comma-separated, from {', '.join(ARCHS)} (default: cnn,vit)")  # fmt: skip
    p.add_argument("--backends", default="jax,torch",
                   help=f"comma-separated, from {', '.join(BACKENDS)} "
                   "(default: jax,torch)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128,
                   help="training batch size, every arch (default: 128)")  # fmt: skip
    p.add_argument("--steps", type=int, default=20,
                   help="training steps per measurement (default: 20)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved measurements per backend (default: 5)")  # fmt: skip
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size for vgg16, alexnet, faster_rcnn; the others train at the data's "
        "own (default: the arch's)",
    )
    p.add_argument("--preset", default=None, help="model preset (default: each arch's)")
    p.add_argument("--recipe", default="default",
                   help="each arch's training recipe, e.g. lab-cpu (default: default)")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the records to this file")
    return p


def benchmark(args: argparse.Namespace) -> None:
    """Measures what `args` asks for and prints (and writes) the table."""
    archs = [a for a in args.archs.split(",") if a]
    backend_names = [b for b in args.backends.split(",") if b]
    if not archs:
        raise UserError(f"--archs is empty; name one or more of {', '.join(ARCHS)}")
    if not backend_names:
        raise UserError(f"--backends is empty; name one or more of {', '.join(BACKENDS)}")
    for arch in archs:
        get_arch(arch)
    for b in backend_names:
        if b not in BACKENDS:
            raise UserError(
                f"unknown backend {b!r} in --backends; available: {', '.join(BACKENDS)}"
            )
    for name in ("batch_size", "steps", "repeats"):
        if not 1 <= getattr(args, name) <= MAX_INT:
            raise UserError(f"--{name.replace('_', '-')} must be between 1 and {MAX_INT:,} "
                            f"(2**31 - 1), got {getattr(args, name)}")  # fmt: skip
    specs = [
        Spec(a, b, args.batch_size, args.steps, args.image_size, args.preset, recipe=args.recipe)
        for a in archs
        for b in backend_names
        if backends.entry(b).trains in get_arch(a).backends
    ]
    if not specs:
        names = sorted({BACKEND_NAMES[backends.entry(b).trains] for b in backend_names})
        raise UserError(f"nothing to measure: the {' and '.join(names)} backend has no "
                        f"{', '.join(archs)}")  # fmt: skip
    for spec in specs:  # a bad --preset, --recipe or --image-size, before any worker starts
        train_config(spec)
    sized = [a for a in archs if get_arch(a).recipe(args.recipe).image_size is not None]
    if args.image_size is not None and not sized:  # as train.py says it
        trains = "trains" if len(archs) == 1 else "train"
        takers = ", ".join(a for a in ARCHS if ARCHS[a].recipe("default").image_size)
        raise UserError(f"--image-size does not apply here: --archs {','.join(archs)} {trains} "
                        f"at the data's own size (it sizes the inputs of {takers})")  # fmt: skip
    if args.json:
        probe_writable_file(Path(args.json), "--json")

    print(
        f"benchmark on {describe_host()}: {len(specs)} configurations, batch "
        f"{args.batch_size}, {args.steps} steps, {args.repeats} interleaved repeats",
        file=sys.stderr,
    )
    records = run_benchmark(specs, args.repeats, log=lambda m: print(m, file=sys.stderr))
    for r in records:
        r["host"] = describe_host()
    print(markdown(records))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with writing(Path(args.json), "free disk space, or choose another --json"):
            Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    failed = [r for r in records if "error" in r]
    if failed:
        names = "; ".join(f"{r['arch']} / {r['backend']}: {r['error']}" for r in failed)
        raise RunFailed(f"{len(failed)} configuration(s) failed: {names}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(lambda: benchmark(args))
