"""python -m zmlx.bench.report CAPSULE [CAPSULE ...]: the `zmlx report` command (zmlx.cli.report)."""

if __name__ == "__main__":
    from zmlx.cli.report import main

    main()
