#!/usr/bin/env bash
# Issue 17's GPU half in one run: every figure a lent GPU machine owes the README, each step
# logged, time-boxed, and summed up in summary.md.
#
#   bash scripts/gpu_checks.sh                        # every step, in the order below
#   bash scripts/gpu_checks.sh lab compat             # only these steps
#   QUICK=1 bash scripts/gpu_checks.sh                # a few-minute rehearsal on any machine
#
# Steps: env, bench (cnn, vit), epoch (the CNN over 60,000 synthetic images + eval on 10,000),
# tta (time to 99.0% / 98.5% on the official test set), bench-big (vgg16, alexnet,
# faster_rcnn), determinism (--deterministic twice), lab (run_lab.py), compat (parity tests).
# BUDGET (seconds, default 540) bounds the whole run: a step gets what is left, less a reserve,
# and one that no longer fits is skipped and listed. Results go to $OUT (default runs/gpu):
# summary.md, bench.json, bench-big.json, lab.png, logs.txt and runs.tgz (every metrics.json).
# Wheels in .whl/ (mlxtend, which the GPU image lacks) are installed to /tmp/site first.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-540}
WORK=$(mktemp -d /tmp/gpu-checks.XXXX)
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env bench epoch tta bench-big determinism lab compat)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}
T0=$SECONDS

# step NAME SECONDS COMMAND: runs COMMAND under min(SECONDS, what the budget has left - 20 s).
step() {
  local name=$1 want=$2 left=$((BUDGET - (SECONDS - T0) - 20))
  shift 2
  if [ "$left" -lt 30 ]; then
    echo "| $name | skipped: ${left}s of the budget left |" >>"$WORK/steps.md"
    return
  fi
  local limit=$((want < left ? want : left)) start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" bash -c "$*" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "| $name | exit $rc in $((SECONDS - start)) s (limit $limit s) |" >>"$WORK/steps.md"
  tail -n 3 "$WORK/$name.log"
}

train() {  # train ARGS...: scripts/train.py without progress bars
  echo "$PY scripts/train.py --no-progress $*"
}

if [ "$QUICK" = 1 ]; then
  SMALL="--archs cnn,vit --preset tiny --batch-size 8 --steps 3 --repeats 2"
  BIG="--archs alexnet --batch-size 4 --steps 2 --repeats 2 --image-size 64"
  EPOCH="--preset tiny --epochs 2"
  CNN_TTA="--preset tiny --epochs 2" VIT_TTA="--preset micro --epochs 2"
  DET="--preset tiny --epochs 1" LAB="--archs cnn --backends jax,torch -- --epochs 1"
  COMPAT="parity_tests/test_cnn.py"
else
  SMALL="--archs cnn,vit --steps 200 --repeats 5"
  BIG="--archs vgg16,alexnet,faster_rcnn --steps 20 --repeats 3"
  EPOCH="--epochs 3" CNN_TTA="" VIT_TTA="" DET="--epochs 2" LAB=""
  COMPAT="parity_tests/test_cnn.py parity_tests/test_vit.py parity_tests/test_finetune.py"
fi

for s in "${STEPS[@]}"; do
  case $s in
  env)
    step env 60 "nvidia-smi; $PY --version; $PY -m pip list 2>/dev/null | grep -iE \
      '^(jax|jaxlib|flax|optax|orbax-checkpoint|chex|torch|torchvision|numpy|mlxtend) '; \
      $PY -c 'import jax; print(jax.devices())'"
    ;;
  bench)
    step bench 240 "$PY scripts/benchmark.py --backends jax,torch,torch-compile $SMALL \
      --json $WORK/bench.json"
    ;;
  bench-big)
    step bench-big 240 "$PY scripts/benchmark.py --backends jax,torch,torch-compile $BIG \
      --json $WORK/bench-big.json"
    ;;
  epoch)  # the CNN: an epoch over 60,000 images of MNIST's shape, then the 10,000 test images
    for b in jax torch; do
      for bs in 64 256; do
        step "epoch-$b-$bs" 90 "$(train --arch cnn --backend $b --data-source synthetic \
          --batch-size $bs --eval-every 1 $EPOCH --out $WORK/epoch-$b-$bs)"
      done
    done
    ;;
  tta)  # time to accuracy on MNIST's official test set (the default data)
    for b in jax torch; do
      step "tta-cnn-$b" 120 "$(train --arch cnn --backend $b --target-accuracy 0.99 \
        --eval-every 1 $CNN_TTA --out $WORK/tta-cnn-$b)"
      step "tta-vit-$b" 180 "$(train --arch vit --backend $b --target-accuracy 0.985 \
        --eval-every 1 $VIT_TTA --out $WORK/tta-vit-$b)"
    done
    ;;
  determinism)  # the same run twice under --deterministic: bit-identical weights
    for arch in cnn vit; do
      for b in jax torch; do
        for run in 1 2; do
          step "det-$arch-$b-$run" 90 "$(train --arch $arch --backend $b --deterministic \
            --save-weights $DET --out $WORK/det-$arch-$b-$run)"
        done
      done
    done
    ;;
  lab)
    step lab 400 "$PY scripts/run_lab.py --out $WORK/lab $LAB"
    ;;
  compat)  # the parity tests on this machine's JAX (0.11 on the GPU image)
    step compat 150 "$PY -m pytest -q -p no:cacheprovider -n 4 $COMPAT"
    ;;
  *)
    echo "error: unknown step $s; steps: env bench epoch tta bench-big determinism lab compat" >&2
    exit 2
    ;;
  esac
done

# summary.md: what each step gave, from the files it wrote.
WORK=$WORK $PY - >"$OUT/summary.md" <<'EOF'
import json, os, pathlib
import numpy as np

work = pathlib.Path(os.environ["WORK"])
print("# GPU checks\n\n| step | result |\n|---|---|")
print((work / "steps.md").read_text() if (work / "steps.md").exists() else "")
env = work / "env.log"
if env.exists():
    print("## Machine\n\n```\n" + env.read_text()[-1500:] + "\n```\n")


def metrics(name):
    path = work / name / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(title, header, rows):
    if rows:
        print(f"## {title}\n\n| {' | '.join(header)} |\n|{'---|' * len(header)}")
        print("\n".join(f"| {' | '.join(row)} |" for row in rows) + "\n")


rows = []
for b in ("jax", "torch"):
    for bs in (64, 256):
        if m := metrics(f"epoch-{b}-{bs}"):  # the first epoch pays for warm-up and autotuning
            later = [h["train_time_s"] + h["eval_time_s"] for h in m["history"][1:]]
            best = f"{min(later):.3f} s" if later else "–"
            rows.append((b, str(bs), best, f"{m['test_accuracy']:.2%}", m["device"]))
table("The CNN: one epoch over 60,000 synthetic images + evaluation on 10,000",
      ("backend", "batch", "best later epoch (train + eval)", "accuracy (synthetic)", "device"),
      rows)

rows = []
for arch in ("cnn", "vit"):
    for b in ("jax", "torch"):
        if m := metrics(f"tta-{arch}-{b}"):
            t = m.get("time_to_target_s")
            reached = f"{t:.1f} s, epoch {m['target_epoch']}" if t is not None else "not reached"
            rows.append((arch, b, f"{m['target_accuracy']:.1%}", reached,
                         f"{m['test_accuracy']:.2%}", f"{m['compile_time_s']:.1f} s"))
table("Time to accuracy (MNIST's official test set; 5,000 training digits)",
      ("arch", "backend", "target", "time (train + eval)", "final accuracy", "compile"), rows)

rows = []
for arch in ("cnn", "vit"):
    for b in ("jax", "torch"):
        runs = [metrics(f"det-{arch}-{b}-{r}") for r in (1, 2)]
        if all(runs):
            import torch

            a, c = (torch.load(work / f"det-{arch}-{b}-{r}" / "model.pth") for r in (1, 2))
            weights = a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
            losses = [[h["train_loss"] for h in m["history"]] for m in runs]
            same = losses[0] == losses[1] and runs[0]["confusion_matrix"] == runs[1]["confusion_matrix"]
            rows.append((arch, b, "yes" if weights else "NO", "yes" if same else "NO"))
table("--deterministic, two runs",
      ("arch", "backend", "weights bit-identical", "losses and predictions identical"), rows)

for name in ("bench", "bench-big", "lab", "compat"):
    log = work / f"{name}.log"
    if log.exists():
        text = log.read_text()
        start = text.find("| arch |") if name.startswith("bench") else max(len(text) - 3000, 0)
        print(f"## {name}\n\n```\n{text[start:][-6000:]}\n```\n")
EOF
for f in bench.json bench-big.json; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"; done
[ -f "$WORK/lab/comparison.png" ] && cp "$WORK/lab/comparison.png" "$OUT/lab.png"
for f in "$WORK"/*.log; do echo "===== $(basename "$f")"; cat "$f"; done >"$OUT/logs.txt"
tar czf "$OUT/runs.tgz" -C "$WORK" --exclude='*.pth' --exclude='checkpoints' . 2>/dev/null
echo "wrote $OUT/summary.md ($(((SECONDS - T0))) s)"
cat "$OUT/summary.md"
