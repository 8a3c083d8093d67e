#!/usr/bin/env bash
# GPU check (item 6 of docs/RESULTS.md): one script for one H100 (or any CUDA GPU), about 8 minutes, that prints
#   - Fréchet distance time on the GPU vs pytorch-fid on the CPU (benchmarks/fid_bench.py --device cuda),
#   - merge GB/s vs a device-to-device copy, InceptionV3 images/s in fp32 and bf16 with the FD difference,
#     and one full trial on a CIFAR-10-sized U-Net with random weights and its stage times
#     (benchmarks/gpu_probe.py),
#   - the merge benchmark at GPU size (benchmarks/merge_bench.py --device cuda: roofline, low-precision error),
#   - the whole search through Ray Tune (launch/tune_cm.py) on a CIFAR-10-sized run with 1, 2 and 4 trials
#     sharing the GPU: trials/s, scaling, peak GPU memory per worker, stage times
#     (benchmarks/gpu_search_check.py; tests/test_gpu_search_check.py runs it on the CPU at a tiny size).
# Every step has its own time limit, so one slow or failing step does not lose the others' output; the exit
# status is the number of failed steps. The output is also saved to docs/results/gpu_check.txt (replaced only
# when the script gets past the CUDA check), which `python benchmarks/run_all.py` puts into docs/RESULTS.md.
#
#     bash benchmarks/gpu_check.sh            # from the repository root or anywhere
set -u
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export PYTHONUNBUFFERED=1
OUTPUT=docs/results/gpu_check.txt

step() {  # step SECONDS TITLE COMMAND...
    local limit=$1 title=$2; shift 2
    echo "=== ${title} (limit ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        failed=$((failed + 1))
        echo "!!! ${title}: exit ${rc}$([ $rc -eq 124 ] && echo ' (time limit)')"
    fi
    echo "--- ${title}: $((SECONDS - start)) s"
}

check() {
    failed=0
    echo "=== lcsc-ray GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"
    if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: torch sees no CUDA device; run this on a GPU machine with a CUDA build of torch" >&2
        return 255
    fi
    step 150 "Frechet distance: GPU vs pytorch-fid (CPU)" python benchmarks/fid_bench.py --device cuda --repeats 5 --inception-images 1000
    step 150 "merge, Inception fp32/bf16, one full CIFAR-10-sized trial" python benchmarks/gpu_probe.py --device cuda --checkpoints 40 --inception-images 2000 --trial-samples 5000
    step 150 "merge benchmark (K=40, 10.5M parameters)" python benchmarks/merge_bench.py --device cuda --checkpoints 40 --repeats 20
    step 240 "search through Ray Tune: 1, 2, 4 trials per GPU" python benchmarks/gpu_search_check.py --device cuda --checkpoints 40 --trials 24 --samples 256 --final-samples 512
    echo "=== done: ${failed} step(s) failed"
    return $failed
}

mkdir -p "$(dirname "$OUTPUT")"
check 2>&1 | tee "$OUTPUT.partial"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 255 ]; then
    rm -f "$OUTPUT.partial"
    exit 2
fi
mv "$OUTPUT.partial" "$OUTPUT"
exit "$rc"
