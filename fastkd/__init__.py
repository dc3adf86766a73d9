"""fastkd: fused, memory-lean knowledge-distillation losses for PyTorch."""

from ._dispatch import BackendUnavailableError, resolve_backend
from .functional import distillation_loss
from .modules import DistillationLoss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DistillationLoss",
    "distillation_loss",
    "resolve_backend",
]
