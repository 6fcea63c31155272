"""Fused kernels, one module each: a plain-MLX reference and, per backend, a body."""
