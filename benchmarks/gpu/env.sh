# Sourced on the GPU machine from the project root (carry .device/b, .device/extra and
# .device/stamp): installs MLX's CUDA backend (activate.sh), checks that every tracked file
# of the copy hashes to the blob stamp.sh recorded, and exports ZMLX_GIT_COMMIT (and
# ZMLX_GIT_DIRTY=0, since the tree is that commit's), so results carry the commit whose code
# ran. A mismatch (a stale stamp, an edited file) stops here.
source benchmarks/gpu/activate.sh || return $? 2>/dev/null || exit $?
if ! python3 benchmarks/gpu/check_tree.py .device/stamp; then
  return 2 2>/dev/null || exit 2
fi
ZMLX_GIT_COMMIT="$(cat .device/stamp/COMMIT)"
ZMLX_GIT_DIRTY=0
# The copy may hold a stale .git that lacks the stamped commit, and zmlx's stamp asks any
# checkout it finds whether that commit exists. The tree was just verified file by file, so
# hide every checkout: the stated commit is then recorded as given.
GIT_DIR=/nonexistent
export ZMLX_GIT_COMMIT ZMLX_GIT_DIRTY GIT_DIR
# MLX's PTX cache, one folder for every process of this machine: MLX keeps its own compiled
# kernels there, and benchmarks/gpu/ptx_bank.sh adds zmlx's, compiled from the sources that
# patched processes record (ZMLX_KERNEL_SOURCES; zmlx.kernels.ptx_cache), so that a later
# process skips NVRTC for them. A cache carried in .device/ptx (ptx_bank.sh's output) is
# restored first, only where its manifest is this machine's (MLX, NVRTC, compute capability).
export MLX_PTX_CACHE_DIR="$HOME/mlx-ptx"
export ZMLX_KERNEL_SOURCES="$HOME/zmlx-kernel-sources"
mkdir -p "$MLX_PTX_CACHE_DIR" "$ZMLX_KERNEL_SOURCES"
if [ -f .device/ptx/ptx-cache.tgz ] && [ ! -f "$MLX_PTX_CACHE_DIR/.restored" ]; then
  ptx_here="$(python3 benchmarks/gpu/ptx_cache.py manifest 2>/dev/null)"
  if [ -n "$ptx_here" ] && [ "$ptx_here" = "$(cat .device/ptx/ptx-manifest 2>/dev/null)" ]; then
    tar xzf .device/ptx/ptx-cache.tgz -C "$MLX_PTX_CACHE_DIR" && touch "$MLX_PTX_CACHE_DIR/.restored"
    echo "env.sh: MLX's PTX cache restored ($(find "$MLX_PTX_CACHE_DIR" -name '*.ptx' | wc -l) modules)"
  else
    echo "env.sh: the carried PTX cache is for '$(cat .device/ptx/ptx-manifest 2>/dev/null)', this machine is '$ptx_here': not restored"
  fi
fi
