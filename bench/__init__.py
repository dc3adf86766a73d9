"""Benchmark harness (installed as `fastkd.bench`); results live in bench/results/."""
