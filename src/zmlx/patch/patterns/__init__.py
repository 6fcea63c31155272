"""The registry: every pattern zmlx knows, by name (one small file each)."""

from zmlx.patch.patterns import moe_combine, moe_mlp, moe_router, residual_norm

PATTERNS = {
    p.name: p
    for p in (moe_router.PATTERN, moe_combine.PATTERN, residual_norm.PATTERN, moe_mlp.PATTERN)
}
