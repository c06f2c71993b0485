#!/usr/bin/env bash
# Everything only a GPU can show (issues 23 and 26), in one command, for the day a GPU is lent:
#
#     bash benchmarks/gpu_check.sh [RESULTS.md]       # default: benchmarks/gpu_check-<date>-<time>.md
#
# Under 8 minutes on one H100/H200. Each check appends a section with its numbers and a **pass**/**FAIL** line to
# RESULTS.md (the heading names the device): paste it into BENCHMARKS.md. A failing check does not stop the
# others; the exit code is the number of failed checks. Without CUDA the GPU-only checks say "skipped" and the rest
# run on small models (a minute or two), so the script itself can be checked anywhere.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-benchmarks/gpu_check-$(date +%Y%m%d-%H%M%S).md}
failed=0

check() {  # one section of benchmarks/gpu_check.py, in its own process
    echo "== $1" >&2
    if ! timeout "${2:-300}" "$PY" benchmarks/gpu_check.py "$1" --output "$OUT"; then
        failed=$((failed + 1))
        grep -q "^\*\*FAIL\*\*" <(tail -n 3 "$OUT") || printf '**FAIL**: %s did not finish\n\n' "$1" >> "$OUT"
    fi
}

: > "$OUT"
check header 60
check bf16_tokens            # bf16 autocast tokens vs fp32, tolerance stated in the section
check attention_capture      # fused attention vs the block recomputed from captured probabilities
check syncbn                 # SyncBatchNorm conversion under torchrun, 1 process (and 2 with 2 GPUs)
check bench 420              # ViT-B/16 probe step vs the bare bf16 forward, with MFU
check eval_cache             # the eval cache's memory per process
check device_index           # --device cuda:N under torchrun
check cpu_checkpoints        # checkpoints saved from CUDA hold CPU tensors
check input_pipeline 420     # --decoder fast per core vs the paper's PIL pipeline; --decoder gpu (nvjpeg) per GPU

echo "results: $OUT ($failed failed)" >&2
exit "$failed"
