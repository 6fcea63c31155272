#!/usr/bin/env bash
# Run here (the developer machine), from the project root, before carrying a tree to the GPU
# machine: writes .device/stamp/COMMIT (HEAD) and .device/stamp/FILES (`git ls-files -s`: the
# blob hash of every tracked file). Refuses a tree with uncommitted changes, so that a ledger
# line or capsule recorded under that commit is that commit's code.
# Carry .device/stamp with the run; `source benchmarks/gpu/env.sh` there checks the copy.
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
cd "$root"
if [ -n "$(git status --porcelain --untracked-files=normal)" ]; then
  echo "error: the tree has uncommitted changes (git status); commit them before stamping" >&2
  exit 2
fi
mkdir -p .device/stamp
git rev-parse HEAD > .device/stamp/COMMIT
git ls-files -s > .device/stamp/FILES
echo "stamp: $(cat .device/stamp/COMMIT) ($(wc -l < .device/stamp/FILES) files)"
