"""Device code (Triton kernels), installed as `fastkd.kernels`.

Relative imports only; nothing here imports `fastkd`. Triton is imported by the kernel
modules themselves, so importing this package costs nothing without Triton.
"""
