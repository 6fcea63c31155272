"""A prompt fed into a fresh cache as mlx-lm's generate feeds it: the one prefill of zmlx's
measurements (timing, kernel counts, teacher-forced accuracy, the quantized cache).

mlx-lm's `generate_step` sends all of a prompt but its last token through the model
`prefill_step_size` (2048) tokens a call, evaluating the cache and clearing MLX's buffer cache
after each, then the last token with the first decode. Feeding a long prompt in one call
instead holds its whole attention at once: at 32,768 tokens GLM-4.7-Flash's attention scores
and its rope-score mask are 20 heads x 32,768^2 values each, ~86 GB together in bf16 (the
ledger's 32k run of 2026-12-01 ran out of an H200's memory in the host-time measurement's
whole-prompt call).
"""

from __future__ import annotations

import mlx.core as mx

PREFILL_STEP = 2048  # mlx-lm's generate_step default (prefill_step_size)


def prefill(
    model,
    prompt: mx.array,
    chunk: int = PREFILL_STEP,
    cache: list | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
):
    """(cache, logits): `prompt` (1-D token ids) fed into `cache` (a fresh prompt cache of the
    model's, its make_cache() where it has one, when None), all but its last token `chunk`
    tokens a call (each evaluated, MLX's buffer cache cleared after), then the last token;
    logits is the model's raw output for that last call, (1, 1, vocab). With `kv_bits`, the
    cache is quantized as mlx-lm's `--kv-bits` quantizes it (maybe_quantize_kv_cache, from
    position 0) before the last token, so that token and every decode step after it run over
    the quantized cache."""
    cache = prefill_head(model, prompt, chunk, cache)
    n = prompt.size
    if kv_bits is not None:
        from mlx_lm.generate import maybe_quantize_kv_cache

        maybe_quantize_kv_cache(cache, 0, kv_group_size, kv_bits)
    return cache, model(prompt[None, n - 1 :], cache=cache)


def prefill_head(model, prompt: mx.array, chunk: int = PREFILL_STEP, cache: list | None = None) -> list:
    """`cache` (a fresh prompt cache of the model's when None) after all of `prompt` but its
    last token, fed as mlx-lm's generate_step feeds it: what `prefill` and mlx-lm's generation
    with that cache and the last token as the prompt then continue from."""
    from mlx_lm.models.cache import make_prompt_cache

    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 (got {chunk})")
    if prompt.ndim != 1 or prompt.size < 1:
        raise ValueError(f"prompt must be a non-empty 1-D array of token ids (got shape {prompt.shape})")
    if cache is None:
        cache = make_prompt_cache(model)
    n = prompt.size
    for start in range(0, n - 1, chunk):
        model(prompt[None, start : min(start + chunk, n - 1)], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
    return cache
