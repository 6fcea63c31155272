#!/usr/bin/env bash
# Here (the developer machine, no GPU), from the project root: what zmlx.kernels.cuda_check
# needs to compile every CUDA kernel body with NVRTC exactly as MLX would on the GPU
# (compile only; nothing runs). Needs .device/ from setup_here.sh and a mirror of MLX's
# sources (the device headers MLX embeds in libmlx.so are not in its wheel):
#   bash benchmarks/gpu/setup_cuda_check.sh [MLX_SOURCE_GIT_DIR]
# Fills .device/cuda-include/ (cccl, cutlass, cute and mlx headers) and installs NVRTC and
# the CUDA 13.0 runtime headers into the active Python environment.
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
cd "$root"
mlx_src=${1:-/work/.mirror/ml-explore+mlx/repo}
python3 -m pip install -q "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" 2>&1 | grep -v '^WARNING' || true
out=.device/cuda-include
rm -rf "$out" && mkdir -p "$out"
cat .device/a/mlxcuda.part.aa .device/b/mlxcuda.part.ab > .device/mlx-cuda.whl
python3 - "$out" <<'PY'
import sys, zipfile
out = sys.argv[1]
with zipfile.ZipFile(".device/mlx-cuda.whl") as z:
    for name in z.namelist():
        if name.startswith("mlx/include/") and not name.endswith("/"):
            z.extract(name, ".device/wheel")
PY
mv .device/wheel/mlx/include/* "$out"/ && rm -rf .device/wheel .device/mlx-cuda.whl
git -C "$mlx_src" archive HEAD mlx/backend/cuda/device | tar -x -C "$out"
echo "setup_cuda_check: $(find "$out" -type f | wc -l) headers in $out (MLX device headers from $(git -C "$mlx_src" log -1 --format=%h))"
