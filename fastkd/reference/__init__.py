"""Pure-PyTorch reference implementations (backend ``"torch"``): float32 internally for
low-precision inputs, float64 for float64 inputs, chunked over rows."""

from .dense import DIVERGENCES, dense_kd_rows

__all__ = ["DIVERGENCES", "dense_kd_rows"]
