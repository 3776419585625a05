#!/usr/bin/env bash
# The one prepared device run for a session that is lent a GPU (see DEVELOPERS notes in README):
# CUDA tests, then the benchmarks at the issues' sizes; everything lands under $OUT.
#   run: bash tools/gpu_check.sh        (OUT defaults to ./gpu-out)
# Budget: about 4 min of tests + 5 min of benchmarks; each part has its own timeout so that a hang
# in one still returns the other's results.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LORAFAST_TEST_CUDA=1 TRITON_DEFAULT_FP_FUSION=1
python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || tail "$OUT/install.log"
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } > "$OUT/env.txt" 2>&1
timeout 240 python3 -m pytest -q -m cuda -x --durations=10 tests/ > "$OUT/cuda-tests.log" 2>&1
echo "cuda tests rc=$?" | tee -a "$OUT/cuda-tests.log"
tail -5 "$OUT/cuda-tests.log"
timeout 330 python3 -m lorafast bench attention linear-ce rerandomize model --full --device cuda \
    --save "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/bench.log"
tail -60 "$OUT/bench.log"
