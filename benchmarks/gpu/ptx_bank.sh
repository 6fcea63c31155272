#!/usr/bin/env bash
# On the GPU machine, last in a command (after `source benchmarks/gpu/env.sh`): compiles the
# kernel sources this machine's patched processes recorded ($ZMLX_KERNEL_SOURCES) into MLX's
# PTX cache ($MLX_PTX_CACHE_DIR; benchmarks/gpu/ptx_cache.py, JOBS at once, default 12), then
# packs the cache (cubins and kernel names; no sources: MLX's own kernels and zmlx's) into
# $OUT/ptx-cache.tgz with $OUT/ptx-manifest (what it is valid for). Where the whole cache
# packs to more than 15 MiB (a file that comes back, and what a carry can hold beside
# .device/b), only zmlx's kernels are packed, and it says so. At home, keep both:
#   rm -rf .device/ptx && mkdir -p .device/ptx && cp <files_at>/ptx-cache.tgz <files_at>/ptx-manifest .device/ptx/
# and carry .device/ptx with later runs: env.sh restores it where the manifest matches.
set -uo pipefail
: "${OUT:?OUT is not set (source benchmarks/gpu/env.sh and export OUT)}"
: "${MLX_PTX_CACHE_DIR:?MLX_PTX_CACHE_DIR is not set (source benchmarks/gpu/env.sh)}"
python3 benchmarks/gpu/ptx_cache.py compile "$ZMLX_KERNEL_SOURCES" "$MLX_PTX_CACHE_DIR" --jobs "${JOBS:-12}"
# zmlx's entries are packed only where MLX's own compile here to MLX's very cubins (the
# toolchain and options are its JIT's): otherwise nothing leaves this machine
if ! python3 benchmarks/gpu/ptx_cache.py verify "$MLX_PTX_CACHE_DIR"; then
  echo "ptx_bank: not packed (MLX's own entries do not compile here to MLX's cubins, or there are none)"
  exit 1
fi
python3 benchmarks/gpu/ptx_cache.py manifest > "$OUT/ptx-manifest"
limit=$((15 * 1024 * 1024))
tar czf "$OUT/ptx-cache.tgz" -C "$MLX_PTX_CACHE_DIR" --exclude='*.cu' --exclude=.restored .
what="MLX's and zmlx's"
if [ "$(stat -c %s "$OUT/ptx-cache.tgz")" -gt "$limit" ]; then
  (cd "$MLX_PTX_CACHE_DIR" && find . -name 'custom_kernel_zmlx_*' ! -name '*.cu' -print0 |
    tar czf "$OUT/ptx-cache.tgz" --null -T -)
  what="zmlx's only (the whole cache packs to more than 15 MiB)"
fi
echo "ptx_bank: $(find "$MLX_PTX_CACHE_DIR" -name '*.ptx' | wc -l) modules in the cache; packed $what: $(du -h "$OUT/ptx-cache.tgz" | cut -f1)"
