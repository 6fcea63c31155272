# Sourced on the GPU machine from the project root (carry .device/b and .device/extra):
# installs MLX's CUDA backend and mlx-lm (shared/device/install.sh), then the extra wheels.
source .device/b/install.sh || return $? 2>/dev/null || exit $?
if ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir .device/extra/*.whl 2>&1 | grep -vi warning | tail -3
fi
