"""python -m zmlx.validate: the `zmlx validate` command (zmlx.cli.validate; the check itself
is zmlx.fidelity)."""

if __name__ == "__main__":
    from zmlx.cli.validate import main

    main()
