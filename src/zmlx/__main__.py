"""python -m zmlx: the `zmlx` command."""

from zmlx.cli import main

main()
