#!/usr/bin/env bash
# The checks that need one CUDA GPU, in one script (measured: 394 s on one NVIDIA H200, 2026-12-04, before step 4's ViT-L rows and step 5 were added;
# see docs/compare.md, "The day a GPU is at hand"):
#   1. the CUDA tests (tests/test_cuda.py: bf16/fp16 autocast, channels_last, torch.compile, MoMA on CUDA);
#   2. an EfficientNet-B0 teacher at 224 px with bf16 + channels_last + torch.compile (2 epochs);
#   3. a one-GPU `torchrun` MoMA run from that teacher (2 epochs, bf16, channels_last);
#   4. the throughput benchmark (benchmarks/throughput.py) at 224 px, EfficientNet-B0, batch 64, and a KD
#      step with a live ViT-L/16 teacher against the same teacher read from a cache (moma embed);
#   5. loader tiles/s against student step tiles/s at 224 px (throughput.py --tile-store --store-step):
#      the training loader reading tiles decoded from files, from the uint8 tile store and from
#      memory, beside the EfficientNet-B0 step (batch 64) on this GPU; the goal is loader >= step;
#   6. slide prediction on a generated slide of 100,000 tissue tiles of 224 px (JPEG tiles, like a
#      scanner's; about 2 GB under $GPU_CHECK_DIR) with a resnet18 (benchmarks/slides.py --gpu): the
#      goal is 60 s for the slide with 16 CPU cores reading; the line says whether it was met.
# Everything reads the shipped demo tiles only (upscaled to 224 px) and writes under $GPU_CHECK_DIR
# (default: a new temporary folder). Exits non-zero at the first failing step, and at once, with a
# message, where PyTorch sees no CUDA device.
#
#     bash benchmarks/gpu_check.sh              # from the repository root, in the project's venv
#     PYTHON=.venv/bin/python GPU_CHECK_DIR=/scratch/gpu_check bash benchmarks/gpu_check.sh
set -euo pipefail

PYTHON="${PYTHON:-python}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    built=$("$PYTHON" -c "import torch; print(torch.__version__, 'CUDA build', torch.version.cuda)" 2>/dev/null || echo "torch not importable")
    echo "gpu_check: FAILED: no CUDA device visible to PyTorch ($built; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})." >&2
    echo "gpu_check: run it on a machine with an NVIDIA GPU, its driver and a CUDA build of torch." >&2
    exit 2
fi

OUT="${GPU_CHECK_DIR:-$(mktemp -d -t moma-gpu-check-XXXXXX)}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DATA=data/demo/lc25000_lung
GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")
echo "gpu_check: $GPU; output in $OUT"
declare -a TIMES=()

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, stop the script if it fails
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    local start=$SECONDS
    if ! timeout "$limit" "$@"; then
        echo "gpu_check: FAILED at '$name' (exit status above; limit ${limit} s)" >&2
        exit 1
    fi
    TIMES+=("$name: $((SECONDS - start)) s")
}

step "CUDA tests" 240 env MOMA_REQUIRE_CUDA=1 "$PYTHON" -m pytest tests/test_cuda.py -m cuda -q -p no:cacheprovider

step "teacher: EfficientNet-B0, 224 px, bf16, channels_last, torch.compile" 240 \
    "$PYTHON" -m moma train --data "$DATA" --arch efficientnet_b0 --image-size 224 --epochs 2 --batch-size 64 \
    --out "$OUT" --name teacher --device cuda --set train.amp=bf16 --set train.channels_last=true \
    --set train.compile=true --set train.tensorboard=false --set train.progress=false

step "one-GPU torchrun MoMA run" 180 \
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m moma distill --method moma \
    --teacher "$OUT/teacher/best.safetensors" --data "$DATA" --arch efficientnet_b0 --image-size 224 --epochs 2 \
    --batch-size 64 --out "$OUT" --name moma-torchrun --device cuda --set train.amp=bf16 \
    --set train.channels_last=true --set distill.params.queue_size=auto --set train.tensorboard=false \
    --set train.progress=false

step "throughput benchmark, 224 px" 240 \
    "$PYTHON" benchmarks/throughput.py --arch efficientnet_b0 --image-size 224 --batch-size 64 --rounds 3 --steps 4 \
    --skip wait,parts --cache-teacher vit_large_patch16_224 --cache-image-size 224

step "loader tiles/s (files, tile store, memory) against student step tiles/s, 224 px" 240 \
    "$PYTHON" benchmarks/throughput.py --tile-store --store-step --store-sizes 224 --arch efficientnet_b0 \
    --batch-size 64 --steps 4

step "slide predict: 100,000 JPEG tiles of 224 px, resnet18" 420 \
    env SLIDES_BENCH_DIR="$OUT" "$PYTHON" benchmarks/slides.py --gpu --batch-size 256

echo "gpu_check: all passed on $GPU in ${SECONDS} s"
printf '  %s\n' "${TIMES[@]}"
