#!/usr/bin/env bash
# The GPU acceptance run: one command for a lent GPU machine, at most 8 minutes on an H200 (docs/gpu.md, "GPU
# acceptance run"). Here: `bash scripts/gpu_wheels.sh`; then the device tool's `run` with carry [".gpu_wheels"],
# command `bash scripts/gpu_check.sh`, timeout_s 560. Everything lands under $OUT (7 files; at most 8 come back):
#   results.json    every stage's status, seconds and figures, rewritten as each stage ends (partial results)
#   gpu_section.md  the figures as BENCHMARKS.md tables, ready to paste, rewritten as each stage ends
#   setup.log tests.log reward.log step.log server.log   each stage's stdout and stderr
# Stages, each under its own timeout and all within one deadline (GPU_CHECK_BUDGET_S, 470 s):
#   setup   install the carried wheels (--no-index --no-deps), versions, one import of everything the run uses
#   tests   pytest -m gpu over the test files holding gpu marks (new ones join by their mark; vLLM's skip there)
#   reward  benchmarks/bench_reward.py at real shapes: random large-v3 Whisper (fp16), real-size X-codec2 decoder
#   step    benchmarks/bench_gpu_step.py: one GRPO step of a LLaSA-1B-shaped policy with HFSampler
#   server  benchmarks/bench_server.py at real shapes: micro-batching vs one at a time, 16 clients
# Dry run (CPU, toy sizes, no wheel install; the default test suite runs it, tests/test_gpu_check.py):
#   OUT=/tmp/x bash scripts/gpu_check.sh --dry-run
# It makes every module the GPU machine lacks unimportable (scripts/gpu_image.py), so an import the GPU run
# cannot satisfy fails here first, and runs the stages side by side (nothing to install first; half the wait).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # a checkout with scripts/setup.sh's venv uses it; the GPU machine (no .venv travels) python3
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
TOTAL=${GPU_CHECK_BUDGET_S:-$([ $DRY = 1 ] && echo 900 || echo 470)}
START=$SECONDS
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# torchao (imported by torchtune, X-codec2's RoPE) only needs its Python half here; its kernels are built for
# another torch than the image's 2.11
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
MODE=gpu
if [ $DRY = 1 ]; then
  MODE=dry-run
  "$PY" scripts/gpu_image.py "$WORK/blocked.json" || exit 1
  export GPU_IMAGE_BLOCKED="$WORK/blocked.json" PYTHONPATH="$PWD/scripts/gpu_image_site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" scripts/gpu_results.py init --out "$OUT" --work "$WORK" --mode $MODE || exit 1

# run_stage NAME TIMEOUT CMD...: CMD under `timeout`, output to $OUT/NAME.log, then results.json updated.
run_stage() {
  local name=$1 limit=$2
  shift 2
  [ $DRY = 1 ] && limit=$((limit * 5))  # the limits budget an H200's 8 minutes; a shared CPU may be far slower
  local left=$((TOTAL - (SECONDS - START) - 10))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "gpu_check: $name skipped, ${left}s left of ${TOTAL}s" | tee "$OUT/$name.log"
    "$PY" scripts/gpu_results.py record --out "$OUT" --work "$WORK" --stage "$name" --rc -1 --seconds 0 --limit "$limit"
    return
  fi
  echo "gpu_check: $name (limit ${limit}s) ..."
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "gpu_check: $name exit $rc after $((SECONDS - t0))s"
  "$PY" scripts/gpu_results.py record --out "$OUT" --work "$WORK" --stage "$name" --rc $rc \
    --seconds $((SECONDS - t0)) --limit "$limit"
}

# stage NAME TIMEOUT CMD...: in order on the GPU; side by side in the dry run
stage() {
  if [ $DRY = 1 ]; then run_stage "$@" & else run_stage "$@"; fi
}

# -- setup: wheels, versions, one import of all the run needs ---------------------------------------------
setup() {
  if [ $DRY = 0 ]; then
    nvidia-smi || true
    if [ ! -f .gpu_wheels/requirements.txt ]; then
      # a machine set up with scripts/setup.sh --gpu needs none; the device tool's GPU machine does (the import
      # check below says what is missing)
      echo "setup: no .gpu_wheels/ (scripts/gpu_wheels.sh, carried): using the installed packages"
    # Into the image's own environment: what it has at a good version stays, as pip skips what is satisfied.
    elif ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links .gpu_wheels \
        -r .gpu_wheels/requirements.txt; then
      echo "setup: installing into the image's environment failed; installing into $WORK/site (PYTHONPATH)"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
        .gpu_wheels/*.whl || return 3
      echo "$WORK/site" >"$WORK/site_path"
    fi
  fi
  [ -f "$WORK/site_path" ] && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" - "$WORK/setup.json" <<'EOF'
import importlib.metadata as md, json, platform, sys, time
import torch
t0 = time.perf_counter()
import whisper, jiwer, zhconv, cn2an, zhon, fastapi, uvicorn, pydantic, jsonargparse  # noqa: F401
import lightning_grpo.cli, lightning_grpo.reward.whisper, lightning_grpo.reward.server  # noqa: F401
from lightning_grpo.reward.codec import XCodec2Decoder
XCodec2Decoder(None, hidden_dim=64, depth=1, heads=4)
names = ["torch", "transformers", "lightning", "numpy", "openai-whisper", "xcodec2", "torchtune", "torchao",
         "vector-quantize-pytorch", "fastapi", "pydantic", "uvicorn", "jsonargparse", "typing-extensions", "pyarrow",
         "datasets", "huggingface-hub", "anyio", "httpx", "triton", "numba"]
versions = {}
for n in names:
    try:
        versions[n] = md.version(n)
    except md.PackageNotFoundError:
        versions[n] = None
info = {"python": platform.python_version(), "versions": versions, "import_s": round(time.perf_counter() - t0, 1),
        "cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
}
export -f setup
export DRY PY WORK
stage setup 90 bash -c setup
[ -f "$WORK/site_path" ] && export PYTHONPATH="$(cat "$WORK/site_path")${PYTHONPATH:+:$PYTHONPATH}"
[ $DRY = 0 ] && "$PY" -m pip check >>"$OUT/setup.log" 2>&1

# -- tests: every gpu-marked test that can run here ------------------------------------------------------
mapfile -t GPU_TEST_FILES < <(grep -l "mark\.gpu" tests/test_*.py)
if [ $DRY = 1 ]; then
  stage tests 120 "$PY" -m pytest --collect-only -q -m gpu "${GPU_TEST_FILES[@]}"
else
  stage tests 150 "$PY" -m pytest -m gpu -rA --durations=15 --junitxml="$WORK/junit.xml" "${GPU_TEST_FILES[@]}"
fi

# -- reward at real shapes --------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
  REWARD=(--device cpu --whisper random:toy --codec small --samples 2 --batch-size 2 --threads 1)
else
  REWARD=(--device cuda:0 --dtype float16 --whisper random:large-v3 --codec real --samples 16 --batch-size 16 --threads 8)
fi
stage reward 110 "$PY" benchmarks/bench_reward.py "${REWARD[@]}" --json "$WORK/reward.json" --out "$WORK/reward.md"

# -- one GRPO step of a LLaSA-1B-shaped policy ------------------------------------------------------------
if [ $DRY = 1 ]; then STEP=(--smoke --threads 1); else STEP=(); fi
stage step 160 "$PY" benchmarks/bench_gpu_step.py ${STEP[@]+"${STEP[@]}"} --json "$WORK/step.json" --out "$WORK/step.md"

# -- the scoring server with the reward on the GPU ------------------------------------------------------
if [ $DRY = 1 ]; then
  SERVER=(--device cpu --whisper random:toy --codec small --clients 2 --requests-per-client 1 --max-batch-size 2 --threads 1)
else
  SERVER=(--device cuda:0 --dtype float16 --whisper random:large-v3 --codec real --clients 16 --requests-per-client 4
          --max-batch-size 16 --max-wait-ms 10 --threads 8)
fi
stage server 130 "$PY" benchmarks/bench_server.py "${SERVER[@]}" --json "$WORK/server.json" --out "$WORK/server.md"

wait
echo "gpu_check: done in $((SECONDS - START))s; results in $OUT"
"$PY" scripts/gpu_results.py summary --out "$OUT"
rm -rf "$WORK"
