from zmlx.matrix.cli import main

main()
