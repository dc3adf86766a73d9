"""Op boundary: torch.library ops around the kernels and the shared autograd Function."""

from .dense import DenseDistillationFunction, dense_distillation_rows

__all__ = ["DenseDistillationFunction", "dense_distillation_rows"]
