"""Patch lifecycle: registry, traversal, exact unpatch, PatchResult."""

from zmlx.patch.core import (
    PatchResult,
    PatternReport,
    ZmlxWarning,
    is_patched,
    patch,
    patch_result,
    select_patterns,
    unpatch,
)
from zmlx.patch.patterns import PATTERNS

__all__ = [
    "PATTERNS",
    "PatchResult",
    "PatternReport",
    "ZmlxWarning",
    "is_patched",
    "patch",
    "patch_result",
    "select_patterns",
    "unpatch",
]
