"""Skip marks shared by the tests that need a compiler of this machine (conftest's
TOOLCHAIN_SKIPS words are in their reasons, so --require-toolchains fails them instead)."""

import pytest

from zmlx.kernels import cuda_check

needs_nvrtc = pytest.mark.skipif(
    not cuda_check.available(),
    reason=f"needs NVRTC and MLX's CUDA headers: {cuda_check.SETUP}"
    if cuda_check.supported()
    else cuda_check.UNSUPPORTED,
)
