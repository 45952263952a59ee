"""Benchmarks: runnable scripts that print a table and write JSON under docs/bench/."""
