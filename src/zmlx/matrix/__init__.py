"""The JSONL ledger of measurements: python -m zmlx.matrix run|history|report|merge."""
