#!/usr/bin/env bash
# The one prepared device run for a session that is lent a GPU: the CUDA tests, then the
# benchmarks at the issues' sizes, then a plot of the records; everything lands under $OUT
# (at most 5 files: env.txt, cuda-tests.log, bench.log, bench.jsonl, bench.png).
#   run: bash tools/gpu_check.sh        (OUT defaults to ./gpu-out)
# Budget, about 9 minutes in all: 4 min of tests, then each benchmark suite under its own timeout,
# so that a hang or an overrun in one still returns the others' records. The device machine's
# own torch and triton are used (install with --no-deps): env.txt records their versions.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LORAFAST_TEST_CUDA=1
python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/bench.log" 2>&1 || tail "$OUT/bench.log"
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tail -1

# 1. CUDA tests: bf16 numerics against fp64 (the interpreter cannot), bitwise repeatability of the
#    attention kernels, TMA and warp-specialised paths, torch.compile, large shapes
timeout 240 python3 -m pytest -q -m cuda --durations=15 tests/ > "$OUT/cuda-tests.log" 2>&1
echo "cuda tests rc=$?" | tee -a "$OUT/cuda-tests.log"
tail -8 "$OUT/cuda-tests.log"

# 2. Benchmarks at the issues' sizes (records with roofline fields appended to bench.jsonl)
run_suite() {  # name, timeout in seconds
    timeout "$2" python3 -m lorafast bench "$1" --full --device cuda --save "$OUT/bench.jsonl" >> "$OUT/bench.log" 2>&1
    echo "bench $1 rc=$?" | tee -a "$OUT/bench.log"
}
run_suite attention 100
run_suite linear-ce 90
run_suite rerandomize 40
run_suite model 160
python3 -m lorafast.bench.plot "$OUT/bench.jsonl" --out "$OUT/bench.png" >> "$OUT/bench.log" 2>&1 \
    || echo "plot failed (matplotlib?)" | tee -a "$OUT/bench.log"
grep -E "^(##|\| )" "$OUT/bench.log" | cut -c1-220 | tail -80
