#!/usr/bin/env bash
# On the GPU machine, last in a command (after `source benchmarks/gpu/env.sh`): compiles the
# kernel sources this machine's patched processes recorded ($ZMLX_KERNEL_SOURCES) into MLX's
# PTX cache ($MLX_PTX_CACHE_DIR; benchmarks/gpu/ptx_cache.py, JOBS at once, default 12), then
# packs the cache (cubins and kernel names; no sources) into $OUT/ptx-cache.tgz with
# $OUT/ptx-manifest (what it is valid for). At home, keep both for the next machine:
#   mkdir -p .device/ptx && cp <files_at>/ptx-cache.tgz <files_at>/ptx-manifest .device/ptx/
# and carry .device/ptx with later runs: env.sh restores it where the manifest matches.
set -uo pipefail
: "${OUT:?OUT is not set (source benchmarks/gpu/env.sh and export OUT)}"
: "${MLX_PTX_CACHE_DIR:?MLX_PTX_CACHE_DIR is not set (source benchmarks/gpu/env.sh)}"
python3 benchmarks/gpu/ptx_cache.py compile "$ZMLX_KERNEL_SOURCES" "$MLX_PTX_CACHE_DIR" --jobs "${JOBS:-12}"
python3 benchmarks/gpu/ptx_cache.py manifest > "$OUT/ptx-manifest"
tar czf "$OUT/ptx-cache.tgz" -C "$MLX_PTX_CACHE_DIR" --exclude='*.cu' --exclude=.restored .
echo "ptx_bank: $(find "$MLX_PTX_CACHE_DIR" -name '*.ptx' | wc -l) modules, $(du -h "$OUT/ptx-cache.tgz" | cut -f1) packed (16 MiB at most comes back)"
