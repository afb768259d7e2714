#!/usr/bin/env bash
# GPU check (issue 17): render throughput and conformance of every GPU renderer, a default ring end to end, ASTRA's
# forward projector reading only the ASTRA geometry export of that ring, ASTRA
# FDK_CUDA against the numba FDK, one ViT-B/16 512^2 bf16 X-WIN training step and the consumer's samples/s.
# Writes $OUT/gpu_check.json (after every section) and $OUT/gpu_check.log; finishes within 8 minutes on one GPU.
#
#   OUT=/some/dir bench/gpu_check.sh              # on a machine with CUDA (torch CUDA build + pip install -e '.[gpu]')
#   OUT=/some/dir bench/gpu_check.sh --dry-run    # the same code on the CPU: Triton interpreter, toy sizes, ~1-2 min
#
# Environment: OUT (default ./gpu_check_out), PYTHON (default .venv/bin/python if present, else python3),
# GPU_CHECK_TIMEOUT_S (hard stop, default 470 s; the script itself skips sections past --budget-s, default 450 s).
# Further arguments go to bench/gpu_check.py (--sections, --budget-s). Exit status: 0 when no section failed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
OUT="${OUT:-$root/gpu_check_out}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
for a in "$@"; do
    if [ "$a" = "--dry-run" ]; then
        export TRITON_INTERPRET=1  # Triton kernels run on torch CPU tensors
        export CUDA_VISIBLE_DEVICES=""  # the dry run is the CPU run, even on a GPU machine
    fi
done
mkdir -p "$OUT"
cd "$root"
echo "[gpu_check] $(date -u +%FT%TZ) python=$PYTHON out=$OUT args=$*" | tee "$OUT/gpu_check.log"
if command -v nvidia-smi >/dev/null 2>&1 && [ -z "${CUDA_VISIBLE_DEVICES+x}" ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/gpu_check.log" || true
fi
timeout --signal=TERM --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-470}" \
    "$PYTHON" "$here/gpu_check.py" --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
