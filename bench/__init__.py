"""The benchmark harness of `fastkd bench` (installed as `fastkd.bench`).

Results go to ./fastkd-bench (or `--out DIR`); the repository's own are in bench/results/,
written by `make bench` (`--out bench/results`).
"""
