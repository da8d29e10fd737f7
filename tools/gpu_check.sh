#!/usr/bin/env bash
# The GPU check of issue 12: one command on a GPU machine that measures the GPU code paths
# (seed groups, counter noise, the compiled update, vectorised evaluation, the gpu profile) and
# packs every small result into one tar.
#
#   bash tools/gpu_carry.sh                 # here, once: wheels + MNIST into .gpu_carry/
#   bash tools/gpu_check.sh                 # there (the device tool's `run`, carry .gpu_carry)
#   bash tools/gpu_check.sh --dry-run-cpu   # here: the same steps on the CPU, tiny sizes
#
# Steps, in this order (each with its own timeout, its output in logs/<step>.log):
#   env       nvidia-smi, python / torch / CUDA versions, the carried MNIST
#   install   the carried wheels (pip --no-index --no-deps), then `pip install -e . --no-deps`
#   tests     python -m pytest tests/test_cuda.py (the CUDA tests)
#   perf      bench.perf, air_nvil_fixed: a single run and groups of 16 and 64 seeds, compiled
#             + counter noise + compiled update (the gpu profile's settings)
#   perf_step   the same groups with train.compile_step=true (the whole step as one graph, a
#             CUDA graph where inductor allows): is it faster than perf's? (then the gpu
#             profile should set it)
#   e2e       bench.perf --end-to-end: 16 seeds of the gpu profile trained together, a few
#             hundred iterations, timed whole (its perf_e2e.json feeds the plan of `slice`)
#   slice     run_all.py --cluster local --profile gpu, 16 seeds of air_nvil_fixed, short
#   report    run_all.py --report-only on the slice's results
#   perf_eager  bench.perf eager, groups of 1 16 64 (last: GPU_NOTES.md has older eager figures)
# Every step is cut to the time left of GPU_CHECK_BUDGET_S (the tar always runs); a step with
# less time left than it needs (a guess per step) is skipped, and summary.txt's last line is
# then the command for a second call: GPU_CHECK_STEPS="..." runs only the steps named (env and
# install always run). Results of an earlier call on the same (warm) machine are kept.
#
# Out: $OUT/summary.txt (one line per step: exit code, seconds) and $OUT/gpu_check.tar.gz
# (logs, JUnit XML, perf JSON/CSV, result.json / metrics.jsonl / runs.csv, report HTML, job
# logs; never checkpoints or models), re-packed after every step.
#
# Environment: OUT (required on the device; the dry run defaults to /tmp/gpu_check_dry/out),
# GPU_CHECK_CARRY (.gpu_carry), GPU_CHECK_WHEELS ($GPU_CHECK_CARRY/wheels), AIR_DATA_DIR
# ($GPU_CHECK_CARRY/mnist when that exists), GPU_CHECK_BUDGET_S (330), GPU_CHECK_WORK (where
# logs and results go: results/gpu_check; dry run /tmp/gpu_check_dry/work), GPU_CHECK_STEPS,
# GPU_CHECK_SEEDS (16), GPU_CHECK_E2E_ITERS (300), GPU_CHECK_SLICE_ITERS (500),
# GPU_CHECK_EVAL (the final evaluation's size in e2e and slice: see EVAL below), PYTHON.
# Step commands are strings that the step's own bash expands (exported variables):
# shellcheck disable=SC2016
set -u

usage() { sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=0
case "${1:-}" in
    "") ;;
    --dry-run-cpu) DRY=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "tools/gpu_check.sh: unknown argument '$1' (expected --dry-run-cpu or nothing)" >&2
       exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-.gpu_carry}
WHEELS=${GPU_CHECK_WHEELS:-$CARRY/wheels}
if [ -z "${AIR_DATA_DIR:-}" ] && [ -d "$CARRY/mnist" ]; then
    export AIR_DATA_DIR=$ROOT/$CARRY/mnist
fi
BUDGET=${GPU_CHECK_BUDGET_S:-330}
RESERVE=30  # seconds kept for a step's kill (timeout -k) and the last tar
START=$(date +%s)

if [ "$DRY" = 1 ]; then
    OUT=${OUT:-/tmp/gpu_check_dry/out}
    WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_dry/work}
    DEVICE=cpu
    SEEDS=${GPU_CHECK_SEEDS:-2}
    E2E_ITERS=${GPU_CHECK_E2E_ITERS:-4}
    SLICE_ITERS=${GPU_CHECK_SLICE_ITERS:-4}
    GROUPS_COMPILED="2"
    GROUPS_EAGER="1 2"
    PERF_N="-n 3 -w 1"
    # Tiny model and evaluation (tests/conftest.py's sizes); no compilation (the tests step
    # compiles on the CPU; here each process would spend ~30 s on it).
    TINY="model.lstm_hidden=32 model.predict_hidden=16 model.encoder_hidden=32"
    TINY="$TINY model.decoder_hidden=32 model.z_what_dim=8 train.batch_size=16"
    TINY="$TINY train.eval_images=48 eval.batch_size=48 train.threads=1"
    EVAL=${GPU_CHECK_EVAL:-eval.final_images=48 eval.iw_images=16 eval.iw_samples=3}
    NOCOMPILE="train.compile=false train.compile_update=false train.compile_step=false"
    export AIR_CUDA_TESTS_DEVICE=cpu OMP_NUM_THREADS=1
else
    if [ -z "${OUT:-}" ]; then
        echo "tools/gpu_check.sh: OUT is not set: name the folder for the results (the device" \
             "tool sets it), or use --dry-run-cpu" >&2
        exit 2
    fi
    WORK=${GPU_CHECK_WORK:-$ROOT/results/gpu_check}
    DEVICE=cuda
    SEEDS=${GPU_CHECK_SEEDS:-16}
    E2E_ITERS=${GPU_CHECK_E2E_ITERS:-300}
    SLICE_ITERS=${GPU_CHECK_SLICE_ITERS:-500}
    # Compiled: 16 first, so that the static 16-seed graph that e2e and slice compile again is in
    # inductor's cache; 64 then recompiles with a dynamic seed axis (a group of 1 would add a
    # third compilation, ~30 s; the single run's row is the reference).
    GROUPS_COMPILED="16 64"
    GROUPS_EAGER="1 16 64"
    PERF_N="-n 50 -w 10"
    TINY=""
    # The final evaluation cut to 2000 images, the K=100 bound to 500 of them (the profile's
    # 10000 / 10000 would take minutes for 16 seeds x 3 test sets in a short check; its time
    # scales with the images: final_evaluation_s in the results).
    EVAL=${GPU_CHECK_EVAL:-eval.final_images=2000 eval.iw_images=500}
    NOCOMPILE=""
fi
LOGS=$WORK/logs
RES=$WORK/results
# The project from its root, the wheels from $WORK/site where they had to go there (below);
# local jobs inherit this environment (bench/local.py).
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT" "$LOGS" "$RES" || exit 2
SUMMARY=$LOGS/summary.txt
: >"$SUMMARY"
STEPS=${GPU_CHECK_STEPS:-tests perf perf_step e2e slice report perf_eager}
SKIPPED=""
LAST_SEED=$((SEEDS - 1))

note() { echo "$*" | tee -a "$SUMMARY"; }

wanted() { [ "$1" = env ] || [ "$1" = install ] || [[ " $STEPS " == *" $1 "* ]]; }

pack() {
    # Every small text result under WORK into $OUT/gpu_check.tar.gz (written, then renamed).
    local list=$WORK/.files
    (cd "$WORK" && find . -type f \( -name '*.log' -o -name '*.txt' -o -name '*.xml' \
        -o -name '*.json' -o -name '*.jsonl' -o -name '*.csv' -o -name '*.html' \
        -o -name '*.yaml' -o -name '*.out' -o -name '*.err' \) -size -4M | sort) >"$list"
    tar -C "$WORK" -czf "$OUT/gpu_check.tar.gz.part" -T "$list" 2>>"$LOGS/pack.log" &&
        mv -f "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
    if [ "$(stat -c %s "$OUT/gpu_check.tar.gz" 2>/dev/null || echo 0)" -gt 15000000 ]; then
        grep -v '\.html$' "$list" >"$list.small"  # over the 16 MiB a file may have: no HTML
        tar -C "$WORK" -czf "$OUT/gpu_check.tar.gz" -T "$list.small"
    fi
    cp -f "$SUMMARY" "$OUT/summary.txt"
}

step() {
    # step NAME CAP MIN COMMAND: run COMMAND (bash) with a timeout of CAP seconds or the
    # budget's time left, whichever is less, if that is at least MIN seconds (a guess of what
    # the step needs to be of any use; else it is skipped, for a second call to run);
    # output to logs/NAME.log, its tail to stdout.
    local name=$1 cap=$2 min=$3 cmd=$4 left t begin rc secs
    wanted "$name" || return 0
    [ "$DRY" = 1 ] && min=5  # the dry run's steps take seconds
    left=$((START + BUDGET - RESERVE - $(date +%s)))
    t=$((cap < left ? cap : left))
    if [ "$t" -lt "$min" ]; then
        note "$(printf '%-11s SKIPPED: %ss left of the %ss budget, it needs ~%ss' "$name" \
            "$((left > 0 ? left : 0))" "$BUDGET" "$min")"
        SKIPPED="$SKIPPED $name"
        return 0
    fi
    echo "=== $name (timeout ${t}s): $cmd"
    echo "\$ $cmd" >"$LOGS/$name.log"
    begin=$(date +%s)
    # Output to a file, not a pipe: a job left behind by a killed step cannot hold us up.
    timeout -k 15 "$t" bash -c "$cmd" >>"$LOGS/$name.log" 2>&1 </dev/null
    rc=$?
    secs=$(($(date +%s) - begin))
    tail -n 25 "$LOGS/$name.log"
    case $rc in
        0) note "$(printf '%-11s ok      %4ss' "$name" "$secs")" ;;
        124 | 137) note "$(printf '%-11s TIMEOUT %4ss (limit %ss) rc=%s' "$name" "$secs" "$t" "$rc")" ;;
        *) note "$(printf '%-11s FAILED  %4ss rc=%s' "$name" "$secs" "$rc")" ;;
    esac
    pack
}

note "gpu_check $(date -u +%FT%TZ) device=$DEVICE dry_run=$DRY budget=${BUDGET}s steps: env install $STEPS"
note "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
     "$(git status --short 2>/dev/null | grep -c . || true) changed file(s)"

export PY WHEELS DEVICE DRY WORK
step env 30 5 '
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$PY" -c "import sys, torch
print(\"python\", sys.version.split()[0], sys.executable)
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\",
      torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(\"gpu\", p.name, round(p.total_memory / 2**30, 1), \"GiB\", p.multi_processor_count,
          \"SMs; free\", round(torch.cuda.mem_get_info()[0] / 2**30, 1), \"GiB\")"
    "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|numpy|pandas|scipy|seaborn|jinja2|tqdm|pillow|pyyaml|cloudpickle|typing.extensions|submitit|omegaconf|pytest) "
    echo "wheels in $WHEELS:"; ls -la "$WHEELS" 2>&1
    echo "AIR_DATA_DIR=${AIR_DATA_DIR:-unset}"; ls -la "${AIR_DATA_DIR:-../shared/data/mnist}" 2>&1
    nproc; free -g; df -h . /tmp
'
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    note "WARNING: torch sees no CUDA device: the steps below will fail or skip"
fi
if [ ! -f "${AIR_DATA_DIR:-../shared/data/mnist}/train-images-idx3-ubyte.gz" ]; then
    note "WARNING: no MNIST in ${AIR_DATA_DIR:-../shared/data/mnist} (run tools/gpu_carry.sh" \
         "here and carry $CARRY): tests will skip, training will fail"
fi

# The carried wheels (submitit, omegaconf: absent there, and nothing can be downloaded there),
# then the project itself (torch and the rest are installed there). The dry run installs the
# wheels into a scratch folder and only checks that the project would install.
if [ "$DRY" = 1 ]; then
    INSTALL_WHEELS='"$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WORK/site" "$WHEELS"/*.whl'
    INSTALL_SELF='"$PY" -m pip install --dry-run --no-index --no-deps --no-build-isolation -e .'
else
    INSTALL_WHEELS='"$PY" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl ||
        "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WORK/site" "$WHEELS"/*.whl'
    INSTALL_SELF='"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
        echo "pip install -e . failed: the steps below import the project from PYTHONPATH=$PWD"'
fi
step install 90 10 "
    set -e
    ls \"\$WHEELS\"/*.whl
    $INSTALL_WHEELS
    $INSTALL_SELF
    \"\$PY\" -c 'import submitit, omegaconf, bench.launcher; print(\"submitit\", submitit.__version__, \"omegaconf\", omegaconf.__version__, \"bench from\", bench.launcher.__file__)'
"

step tests 200 45 "\"\$PY\" -m pytest -q tests/test_cuda.py -rs --durations=0 -p no:cacheprovider \
    --junitxml=\"$LOGS/test_cuda.xml\""
if grep -qE '[0-9]+ skipped' "$LOGS/tests.log" 2>/dev/null; then
    note "NOTE: some CUDA tests were skipped: see logs/tests.log (-rs gives the reasons)"
fi

COMPILED="train.compile=true train.noise=counter train.compile_update=true"
step perf 170 90 "\"\$PY\" -m bench.perf -d $DEVICE -v air_nvil_fixed $PERF_N -g $GROUPS_COMPILED \
    -o \"$RES/perf_compiled\" $COMPILED $TINY $NOCOMPILE"
step perf_step 120 60 "\"\$PY\" -m bench.perf -d $DEVICE -v air_nvil_fixed $PERF_N -g $GROUPS_COMPILED \
    -o \"$RES/perf_step\" $COMPILED train.compile_step=true $TINY $NOCOMPILE"

# End to end: the gpu profile's settings, all seeds in one group, short; the final evaluation
# cut (EVAL). Its perf_e2e.json is copied where the slice's plan reads it (<results>/perf/).
step e2e 130 60 "\"\$PY\" -m bench.perf --end-to-end -d $DEVICE --profile gpu -v air_nvil_fixed \
    --seeds 0-$LAST_SEED --group-size $SEEDS -o \"$RES/e2e\" train.iterations=$E2E_ITERS \
    $EVAL $TINY $NOCOMPILE; rc=\$?; mkdir -p \"$RES/grid/perf\";
    cp -v \"$RES/e2e/perf_e2e.json\" \"$RES/grid/perf/\" || true; exit \$rc"

# A slice of the gpu profile as a user runs it: --cluster local (a submitit job holding the
# GPU), group size from free memory, the plan's expected wall time, then the report.
step slice 160 70 "rm -rf \"$RES/reports\"; mkdir -p \"$RES/grid\";
    find \"$RES/grid\" -mindepth 1 -maxdepth 1 ! -name perf -exec rm -rf {} +;
    \"\$PY\" run_all.py --cluster local --profile gpu --variants air_nvil_fixed \
    --seeds 0-$LAST_SEED --device $DEVICE --results \"$RES/grid\" --reports \"$RES/reports\" \
    --no-progress train.iterations=$SLICE_ITERS $EVAL $TINY $NOCOMPILE"

if [[ " $SKIPPED " == *" slice "* ]]; then
    note "$(printf '%-11s SKIPPED: the slice was' report)"
    SKIPPED="$SKIPPED report"
else
    step report 60 15 "\"\$PY\" run_all.py --report-only --results \"$RES/grid\" \
        --reports \"$RES/reports\" && ls -la \"$RES/reports\""
fi

step perf_eager 90 40 "\"\$PY\" -m bench.perf -d $DEVICE -v air_nvil_fixed $PERF_N -g $GROUPS_EAGER \
    -o \"$RES/perf_eager\" $TINY"

note "done after $(($(date +%s) - START))s; results: $OUT/gpu_check.tar.gz (tar -xzf it:" \
     "logs/, results/)"
if [ -n "$SKIPPED" ]; then
    note "skipped for time: call again at once (the machine stays warm ~30 s) with:" \
         "GPU_CHECK_STEPS=\"${SKIPPED# }\" bash tools/gpu_check.sh$([ "$DRY" = 1 ] && echo " --dry-run-cpu")"
fi
pack
ls -la "$OUT"
