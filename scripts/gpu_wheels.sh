#!/usr/bin/env bash
# The wheels the GPU acceptance run (scripts/gpu_check.sh) needs that the GPU machine's image lacks, downloaded
# HERE (the GPU machine has no network) into .gpu_wheels/ (git-ignored), for Python 3.12 manylinux x86-64, each
# with --no-deps from an explicit pinned list. Carry the folder: device `run` with carry [".gpu_wheels"].
#   bash scripts/gpu_wheels.sh        # ~26 MB; prints the wheels' and the working tree's size against 64 MiB
#
# The image (KINDS.md, 2026-11) has python 3.12, torch 2.11 (CUDA 13), transformers 5.17, lightning 2.6.6,
# numpy, numba, tiktoken, tqdm, einops, pandas, pyarrow, huggingface-hub, anyio, h11, httpx, click, pyyaml,
# matplotlib, tensorboard, pytest. Not torch, vLLM (far over the carry limit) or anything else it has.
# What is here and why (versions: the ones this repository's venv runs its tests with):
#   the reward's Whisper, CER and normalisation: openai-whisper (+more-itertools), jiwer (+rapidfuzz), zhconv,
#     cn2an (+proces), zhon;
#   X-codec2's decoder half: xcodec2 (no deps: it pins torch 2.5), vector-quantize-pytorch (+einx, frozendict),
#     torchtune (its RoPE), whose `import` also loads torchao, torchdata, datasets (+dill, multiprocess) and omegaconf;
#   the scoring server: fastapi (+starlette, opentelemetry-api), pydantic (+pydantic-core, annotated-types,
#     typing-inspection), uvicorn;
#   the CLI (`python -m lightning_grpo fit` on CUDA, a gpu test): jsonargparse (+docstring-parser, typeshed-client);
#   typing-extensions: pydantic needs >= 4.16; gpu_check.sh installs it only if the image's is older.
# Not: soundfile (only tests that need espeak-ng import it, lazily), wandb, vLLM, torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST=.gpu_wheels
LIMIT_MIB=64   # the device tool's carry limit: working tree + carried paths
MARGIN_MIB=8   # kept free for files a session adds before the run

WHEELS=(
  more-itertools==11.2.1
  jiwer==4.0.0 rapidfuzz==3.14.6
  cn2an==0.5.24 proces==0.1.7 zhon==2.1.1
  vector-quantize-pytorch==1.17.8 einx==0.4.3 frozendict==2.5.1
  torchtune==0.6.1 torchao==0.17.0 torchdata==0.11.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 omegaconf==2.4.0
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 uvicorn==0.54.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
  webrtcvad-wheels==2.0.14.post1 praat-parselmouth==0.4.7
  typing-extensions==4.16.0
)
# No wheel on PyPI (sdist only): built here; all three are pure Python (checked below).
BUILT=(openai-whisper==20250625 zhconv==1.4.3 xcodec2==0.1.5)
# Installed there only where the image's version is older (pip skips a requirement already satisfied).
IF_OLDER=("typing-extensions>=4.16.0")

TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_wheels.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$TMP" "$spec" \
    || { echo "gpu_wheels: no Python 3.12 manylinux x86-64 wheel for $spec" >&2; exit 1; }
done
for spec in "${BUILT[@]}"; do
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$TMP" "$spec" \
    || { echo "gpu_wheels: building a wheel of $spec failed (needs setuptools in $PY)" >&2; exit 1; }
done
for w in "$TMP"/*.whl; do
  case "$w" in
    *-none-any.whl|*-cp312-*manylinux*x86_64*.whl|*-abi3-*manylinux*x86_64*.whl|*-py312-none-any.whl) ;;
    *) echo "gpu_wheels: $(basename "$w") does not install on Python 3.12 x86-64" >&2; exit 1 ;;
  esac
done
expected=$(( ${#WHEELS[@]} + ${#BUILT[@]} ))
got=$(ls "$TMP"/*.whl | wc -l)
if [ "$got" -ne "$expected" ]; then
  echo "gpu_wheels: $got wheels for $expected pinned packages" >&2; exit 1
fi
{
  echo "# written by scripts/gpu_wheels.sh: what scripts/gpu_check.sh installs (--no-deps, --no-index)"
  for spec in "${WHEELS[@]}" "${BUILT[@]}"; do
    name=${spec%%==*}
    skip=0
    for cond in "${IF_OLDER[@]}"; do [ "${cond%%>=*}" = "$name" ] && skip=1; done
    [ $skip = 1 ] || echo "$spec"
  done
  for cond in "${IF_OLDER[@]}"; do echo "$cond"; done
} > "$TMP/requirements.txt"
# what gpu_check.sh will ask pip there, asked here for Python 3.12 x86-64: every line resolves to a carried wheel
"$PY" -m pip install -q --dry-run --no-index --no-deps --find-links "$TMP" -r "$TMP/requirements.txt" \
  --python-version 3.12 --implementation cp --only-binary=:all: --target "$TMP/dry_target" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  || { echo "gpu_wheels: the carried wheels do not install on Python 3.12 x86-64 (above)" >&2; exit 1; }
rm -rf "$TMP/dry_target"
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
chmod 755 "$DEST"

wheels_b=$(du -cb "$DEST"/* | tail -1 | cut -f1)
tree_b=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total_b=$((wheels_b + tree_b))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "gpu_wheels: $got wheels in $DEST: $(mib "$wheels_b") MiB; working tree (tracked + untracked, not ignored): $(mib "$tree_b") MiB"
echo "gpu_wheels: $(mib "$total_b") MiB of the ${LIMIT_MIB} MiB carry limit (margin kept: ${MARGIN_MIB} MiB)"
if [ "$total_b" -gt $(( (LIMIT_MIB - MARGIN_MIB) * 1048576 )) ]; then
  echo "gpu_wheels: over $((LIMIT_MIB - MARGIN_MIB)) MiB: drop wheels or untracked files before the run" >&2
  exit 1
fi
