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
