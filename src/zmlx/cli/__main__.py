"""python -m zmlx.cli: the `zmlx` command."""

from zmlx.cli import main

main()
