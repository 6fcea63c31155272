"""Measurement: the decode harness, versioned repro capsules and their report."""
