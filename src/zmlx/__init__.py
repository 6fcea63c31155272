"""zmlx: fused GPU kernels patched into mlx-lm models at run time.

import mlx_lm, zmlx
model, tokenizer = mlx_lm.load(path)
result = zmlx.patch(model)     # family preset; see result / print(result)
zmlx.unpatch(model)            # the original model, exactly
"""

from zmlx.config import ConfigError, PatchConfig
from zmlx.patch import PATTERNS, PatchResult, ZmlxWarning, is_patched, patch, patch_result, unpatch

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "PATTERNS",
    "PatchConfig",
    "PatchResult",
    "ZmlxWarning",
    "__version__",
    "is_patched",
    "patch",
    "patch_result",
    "unpatch",
]
