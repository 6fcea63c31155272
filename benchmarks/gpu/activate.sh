# Sourced on the GPU machine from the project root (carry .device/b and .device/extra):
# installs MLX's CUDA backend and mlx-lm (shared/device/install.sh), then the extra wheels
# (pydantic for typer; nvidia-cuda-crt, the crt/ headers MLX's JIT includes for sm90 qmm).
source .device/b/install.sh || return $? 2>/dev/null || exit $?
if ! python3 - <<'PY' 2>/dev/null
import os, pydantic, nvidia.cu13 as cu
assert any(os.path.exists(os.path.join(p, "include", "crt", "mma.h")) for p in cu.__path__)
PY
then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir .device/extra/*.whl 2>&1 | grep -vi warning | tail -3
fi
