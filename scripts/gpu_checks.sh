#!/usr/bin/env bash
# Issue 17's GPU half in one command: every figure a lent GPU machine owes the README, each step
# time-boxed inside a whole-run budget, its results in $OUT the moment it ends.
#
#   bash scripts/gpu_checks.sh                      # every step, most wanted first
#   BUDGET=200 bash scripts/gpu_checks.sh lab       # only these steps (or groups)
#   QUICK=1 bash scripts/gpu_checks.sh              # a few-minute rehearsal on a CPU
#
# Steps, in the default order (a group name runs all of its steps):
#   env            what the machine is; stops the run if JAX or torch sees no GPU, and falls back
#                  to XLA_FLAGS="" (said in the summary) if XLA rejects a project default flag
#   bench          scripts/benchmark.py, cnn and vit x jax and torch eager (bench-cnn, bench-vit:
#                  one arch)
#   compat         the parity tests on this machine's JAX (0.11 on the GPU image), on the CPU:
#                  JAX_PLATFORMS=cpu, no CUDA, XLA_FLAGS unset (the suite compiles with XLA's own
#                  settings; test_xla_flags and its train.py runs, with each arch's defaults), or
#                  empty after env's fallback; in the background
#                  on the upper half of the cores (so after bench, beside the later timed steps)
#   epoch          epoch-jax-256 epoch-torch-256: the CNN over 60,000 synthetic images of MNIST's
#                  shape + evaluation on 10,000, three epochs (epoch-BACKEND-BATCH for other batches)
#   det            --deterministic, the CNN and the ViT in both backends, each twice, all eight in
#                  parallel (nothing is timed), then compared bit for bit
#   tta            tta-cnn-jax tta-cnn-torch tta-vit-jax tta-vit-torch: time to 99.0% / 98.5%,
#                  with the epoch lines in the log (a run cut at its limit still shows its marks)
#   bench-compile  scripts/benchmark.py, cnn and vit x torch.compile
#   bench-big      bench-vgg16 bench-alexnet bench-faster_rcnn (jax, torch, torch.compile)
#   lab            scripts/run_lab.py
#
# BUDGET (seconds, default 570) bounds the run: a step starts only if its limit fits in what is
# left (less a 15 s reserve for the summary); one that does not is skipped, never started cut
# short, and summary.md ends with the command that runs the skipped ones. $OUT (default runs/gpu)
# gets summary.md, bench.json, logs.txt, runs.tgz (every metrics.json) and lab.png, rewritten after
# each step. Wheels in .whl/ (mlxtend, which the GPU image lacks; flax 0.12.12, tested with jax
# 0.11.2 here, where flax 0.12.8 does not import) are installed to /tmp/site first.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-570}
PY=${PY:-python3}
RESERVE=15
DEFAULT=(env bench compat epoch det tta bench-compile bench-big lab)

expand() {  # a group's steps
  case $1 in
  epoch) echo epoch-jax-256 epoch-torch-256 ;;
  tta) echo tta-cnn-jax tta-cnn-torch tta-vit-jax tta-vit-torch ;;
  bench-big) echo bench-vgg16 bench-alexnet bench-faster_rcnn ;;
  *) echo "$1" ;;
  esac
}
[ $# -eq 0 ] && set -- "${DEFAULT[@]}"
STEPS=()
for s in "$@"; do
  for t in $(expand "$s"); do
    case $t in
    env | compat | bench | det | lab | bench-cnn | bench-vit | bench-compile | bench-vgg16) ;;
    bench-alexnet) ;;
    bench-faster_rcnn | epoch-jax-[0-9]* | epoch-torch-[0-9]* | tta-cnn-jax | tta-cnn-torch) ;;
    tta-vit-jax | tta-vit-torch) ;;
    *)
      echo "error: unknown step $t; steps: ${DEFAULT[*]} (see the top of $0)" >&2
      exit 2
      ;;
    esac
    STEPS+=("$t")
  done
done

WORK=$(mktemp -d /tmp/gpu-checks.XXXX)
mkdir -p "$OUT"
: >"$OUT/logs.txt"
# The GPU image has no install of the project: every process, a test's subprocess too, finds it here.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset JAX_COMPILATION_CACHE_DIR  # every compile time is a real one, the --deterministic pair's too
if ls .whl/*.whl >/dev/null 2>&1; then
  WHEELS=(.whl/*.whl)
  # flax 0.12.9 and later need jax >= 0.11.1: its wheel is left out under an older jax
  if ! python3 -c 'import jax, sys; v = tuple(int(p) for p in jax.__version__.split(".")[:3])
sys.exit(v < (0, 11, 1))' 2>/dev/null; then
    WHEELS=($(printf '%s\n' "${WHEELS[@]}" | grep -v '/flax-'))
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${WHEELS[@]}" && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The CPU parity tests run beside the GPU steps, on their own cores: the lower half runs the
# timed steps, the upper half the tests (only where there are 8 cores or more).
CORES=$(nproc)
FG="" BG="" PARALLEL=1
if [ "$CORES" -ge 8 ] && command -v taskset >/dev/null; then
  FG="taskset -c 0-$((CORES / 2 - 1))" BG="taskset -c $((CORES / 2))-$((CORES - 1))" PARALLEL=8
  echo "The timed steps ran on cores 0-$((CORES / 2 - 1)); compat's parity tests, on" \
    "$((CORES / 2))-$((CORES - 1)) from the end of bench (sharing memory bandwidth and the L3" \
    "cache)." >"$WORK/cores.txt"
fi

if [ "$QUICK" = 1 ]; then
  export REQUIRE_GPU=${REQUIRE_GPU:-0}
  SMALL="--preset tiny --batch-size 8 --steps 3 --repeats 2"
  BIG="--batch-size 4 --steps 2 --repeats 2 --image-size 64"
  EVAL="" EPOCH="--preset tiny --epochs 2" CNN_TTA="--preset tiny --epochs 2"
  VIT_TTA="--preset micro --epochs 2" DET="--preset tiny --epochs 1"
  LAB="--archs cnn --backends jax,torch -- --epochs 1"
  COMPAT="parity_tests/test_cnn.py parity_tests/test_xla_flags.py"
  W_ENV=60 W_COMPAT=300 W_BENCH=120 W_COMPILE=120 W_BIG=180 W_FRCNN=180 W_EPOCH=60 W_DET=200 W_TTA_CNN=60 W_TTA_VIT=60
  W_LAB=120
else
  SMALL="--steps 200 --repeats 5"
  BIG="--steps 20 --repeats 3"
  EVAL="--eval-batch-size 1000" EPOCH="--epochs 3" CNN_TTA="" VIT_TTA="" DET="--epochs 2" LAB=""
  COMPAT="parity_tests/test_cnn.py parity_tests/test_vit.py parity_tests/test_finetune.py \
    parity_tests/test_xla_flags.py parity_tests/test_checkpoint.py parity_tests/test_parallel.py"
  W_ENV=60 W_COMPAT=400 W_BENCH=150 W_COMPILE=200 W_BIG=150 W_FRCNN=240 W_EPOCH=60 W_DET=120 W_TTA_CNN=60 W_TTA_VIT=120
  W_LAB=500
fi
T0=$SECONDS
SKIPPED=()

left() { echo $((BUDGET - (SECONDS - T0) - RESERVE)); }

publish() {  # NAME RC SECONDS: the step's log into $OUT/logs.txt, then the summary
  {
    echo "===== $1: exit $2 in $3 s"
    cat "$WORK/$1.log"
  } >>"$OUT/logs.txt"
  summarize
}

summarize() {  # $OUT/summary.md (and bench.json, lab.png, runs.tgz) from what $WORK holds now
  [ ${#SKIPPED[@]} -gt 0 ] && echo "BUDGET=... bash scripts/gpu_checks.sh ${SKIPPED[*]}" \
    >"$WORK/rerun.txt"
  $PY scripts/gpu_checks.py summary "$WORK" "$OUT" >/dev/null 2>&1 ||
    echo "warning: the summary failed; logs.txt has every step's log" >&2
}

# step NAME SECONDS COMMAND: runs COMMAND under a SECONDS limit if that fits in the budget.
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if [ "$limit" -gt "$(left)" ]; then
    echo "| $name | skipped: wants ${limit} s, $(left) s of the budget left |" >>"$WORK/steps.md"
    SKIPPED+=("$name")
    echo "== $name: skipped (wants ${limit} s, $(left) s left)"
    return 1
  fi
  local cmd="$*"
  echo "== $name (limit ${limit} s): ${cmd:0:240}"
  timeout --kill-after=10 "$limit" $FG bash -c "$*" >"$WORK/$name.log" 2>&1
  rc=$?
  echo "| $name | exit $rc in $((SECONDS - start)) s (limit $limit s) |" >>"$WORK/steps.md"
  tail -n 3 "$WORK/$name.log"
  publish "$name" $rc $((SECONDS - start))
  return $rc
}

train() {  # train ARGS...: scripts/train.py's command line, without progress bars
  echo "$PY scripts/train.py --no-progress $*"
}

train_logged() {  # train_logged ARGS...: with progress, so that each epoch's line is logged
  echo "$PY scripts/train.py $*"
}

PYTEST="env -u XLA_FLAGS JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= $PY -m pytest -q -p no:cacheprovider -n 4 $COMPAT"
COMPAT_PID="" COMPAT_LAST=0
start_compat() {  # in the background on the upper cores, its limit fixed now
  local limit=$W_COMPAT start=$SECONDS
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -lt 60 ]; then
    SKIPPED+=(compat)
    echo "| compat | skipped: $(left) s of the budget left |" >>"$WORK/steps.md"
    return
  fi
  echo "== compat (background, limit ${limit} s): $PYTEST"
  (
    timeout --kill-after=10 "$limit" $BG bash -c "$PYTEST" >"$WORK/compat.log" 2>&1
    rc=$?
    echo "| compat | exit $rc in $((SECONDS - start)) s (limit $limit s; in the background," \
      "on CPU cores of its own) |" >"$WORK/compat.row"
    exit $rc
  ) &
  COMPAT_PID=$!
}

det_runs() {  # the eight --deterministic runs, a command line each
  for arch in cnn vit; do
    for b in jax torch; do
      for r in 1 2; do
        echo "XLA_PYTHON_CLIENT_PREALLOCATE=false $(train --arch $arch --backend $b \
          --deterministic --save-weights $DET --out "$WORK/det-$arch-$b-$r") \
          >$WORK/det-$arch-$b-$r.log 2>&1"
      done
    done
  done
}

for s in "${STEPS[@]}"; do
  case $s in
  env)
    step env $W_ENV "nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,\
clocks.max.sm,power.limit --format=csv 2>&1; $PY --version; echo \"\$(nproc --all) cores\"; \
lscpu | grep -E '^(Model name|Socket|Core|Thread|NUMA node\\(s\\))'; \
$PY -m pip list 2>/dev/null | grep -iE \
'^(jax|jaxlib|jax-cuda[0-9]+-plugin|flax|optax|orbax-checkpoint|chex|torch|torchvision|numpy|mlxtend) '; \
$PY scripts/gpu_checks.py env"
    rc=$?
    if [ $rc -ne 0 ] && [ -z "${XLA_FLAGS+x}" ] && grep -q "Unknown flag" "$WORK/env.log" &&
      XLA_FLAGS="" timeout --kill-after=5 60 $PY scripts/gpu_checks.py env >>"$WORK/env.log" 2>&1
    then
      export XLA_FLAGS=""  # a user's XLA_FLAGS, even empty, stands: no run sets the defaults
      PYTEST="${PYTEST/env -u XLA_FLAGS /env }"  # compat too: its CLI runs would set them
      echo "| env | the project's default XLA_FLAGS abort this XLA: every step runs with" \
        "XLA_FLAGS=\"\" |" >>"$WORK/steps.md"
    elif [ $rc -ne 0 ]; then
      echo "error: the env step failed (exit $rc); $OUT/logs.txt says why" >&2
      exit 1
    fi
    ;;
  compat)  # beside the GPU steps where the cores allow, else last
    if [ -n "$BG" ]; then start_compat; else COMPAT_LAST=1; fi
    ;;
  bench | bench-cnn | bench-vit)  # JAX against torch eager first: the issue's main figure
    archs=cnn,vit
    [ "$s" != bench ] && archs=${s#bench-}
    step "$s" $W_BENCH "$PY scripts/benchmark.py --archs $archs --backends jax,torch $SMALL \
      --json $WORK/$s.json"
    ;;
  bench-compile)  # torch.compile's cold compiles (Inductor, Triton) are the long part
    step "$s" $W_COMPILE "$PY scripts/benchmark.py --archs cnn,vit --backends torch-compile \
      $SMALL --json $WORK/$s.json"
    ;;
  bench-*)  # torch.compile does not take torchvision's detector
    backends=jax,torch,torch-compile limit=$W_BIG
    [ "$s" = bench-faster_rcnn ] && backends=jax,torch limit=$W_FRCNN  # JAX compiles ~1 min
    step "$s" "$limit" "$PY scripts/benchmark.py --archs ${s#bench-} \
      --backends $backends $BIG --json $WORK/$s.json"
    ;;
  epoch-*)
    b=${s#epoch-} && b=${b%-*}
    step "$s" $W_EPOCH "$(train --arch cnn --backend "$b" --data-source synthetic \
      --batch-size "${s##*-}" --eval-every 1 $EVAL $EPOCH --out "$WORK/$s")"
    ;;
  tta-cnn-*)  # with progress: its epoch lines are the record if the limit cuts it
    step "$s" $W_TTA_CNN "$(train_logged --arch cnn --backend "${s##*-}" --target-accuracy 0.99 \
      --eval-every 1 $EVAL $CNN_TTA --out "$WORK/$s")"
    ;;
  tta-vit-*)
    step "$s" $W_TTA_VIT "$(train_logged --arch vit --backend "${s##*-}" --target-accuracy 0.985 \
      --eval-every 1 $EVAL $VIT_TTA --out "$WORK/$s")"
    ;;
  det)  # nothing here is timed: the eight runs share the GPU, in parallel where cores allow
    det_runs >"$WORK/det.cmds"
    step det $W_DET "timeout --kill-after=5 $((W_DET - 20)) xargs -d '\n' -P $PARALLEL -I{} \
      bash -c {} <$WORK/det.cmds; $PY scripts/gpu_checks.py det $WORK"
    ;;
  lab)
    step lab $W_LAB "$PY scripts/run_lab.py --out $WORK/lab $LAB"
    ;;
  esac
done

[ "$COMPAT_LAST" = 1 ] && step compat $W_COMPAT "$PYTEST"
if [ -n "$COMPAT_PID" ]; then
  wait "$COMPAT_PID"
  rc=$?
  cat "$WORK/compat.row" >>"$WORK/steps.md"
  tail -n 3 "$WORK/compat.log"
  publish compat $rc "$(sed -E 's/.* in ([0-9]+) s.*/\1/' "$WORK/compat.row")"
fi
summarize
echo "wrote $OUT ($((SECONDS - T0)) s)"
cat "$OUT/summary.md"
