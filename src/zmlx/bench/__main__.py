import sys

print("usage: python -m zmlx.bench.report CAPSULE [CAPSULE ...]", file=sys.stderr)
sys.exit(2)
