#!/usr/bin/env bash
# Run here (the developer machine), from the project root, before using the GPU machine.
# Fills .device/ through shared/device/prepare.sh, and .device/extra/ with the wheels
# zmlx needs there beyond those (typer's pydantic), for Python 3.12 x86-64, and nvidia-cuda-crt
# (the CUDA headers under crt/, which MLX's JIT needs for its sm90 quantized matmul and the
# machine's CUDA 13 libraries lack).
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
cd "$root"
bash ../shared/device/prepare.sh
mkdir -p .device/extra
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/extra pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  nvidia-cuda-crt==13.0.88 \
  2>&1 | grep -v '^WARNING: Location' || true
cp benchmarks/gpu/activate.sh .device/extra/
du -sh .device/extra
echo "setup_here: carry .device/a on a fresh machine first, then [.device/b, .device/extra] on every run:"
echo "  source .device/extra/activate.sh && <command>"
