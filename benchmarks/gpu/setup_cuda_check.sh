#!/usr/bin/env bash
# Here (the developer machine, no GPU): what zmlx.kernels.cuda_check needs to compile every
# CUDA kernel body with NVRTC exactly as MLX would on the GPU (compile only; nothing runs).
# The same step as CI's (.ci/run): NVRTC, the CUDA 13.0 headers and the installed MLX's CUDA
# headers from PyPI, into ~/.cache/zmlx/cuda-check/ (see src/zmlx/kernels/cuda_setup.py).
#   bash benchmarks/gpu/setup_cuda_check.sh [--force]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python
exec "$py" -m zmlx.kernels.cuda_setup "$@"
