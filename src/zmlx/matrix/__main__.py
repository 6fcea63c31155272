"""python -m zmlx.matrix: the `zmlx matrix` command (zmlx.cli.matrix)."""

from zmlx.cli.matrix import main

main()
