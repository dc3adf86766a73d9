"""fastkd: fused, memory-lean knowledge-distillation losses for PyTorch."""

from ._dispatch import BackendUnavailableError, resolve_backend
from .functional import distillation_loss
from .losses import (
    AttentionTransferLoss,
    DecoupledKDLoss,
    HiddenStateLoss,
    HintLoss,
    MultiTeacherDistillationLoss,
    RKDLoss,
    attention_map_loss,
    attention_transfer_loss,
    decoupled_kd_loss,
    hidden_state_loss,
    hint_loss,
    multi_teacher_distillation_loss,
    rkd_loss,
    similarity_preserving_loss,
)
from .modules import DistillationLoss

__version__ = "0.1.0"

__all__ = [
    "AttentionTransferLoss",
    "BackendUnavailableError",
    "DecoupledKDLoss",
    "DistillationLoss",
    "HiddenStateLoss",
    "HintLoss",
    "MultiTeacherDistillationLoss",
    "RKDLoss",
    "attention_map_loss",
    "attention_transfer_loss",
    "decoupled_kd_loss",
    "distillation_loss",
    "hidden_state_loss",
    "hint_loss",
    "multi_teacher_distillation_loss",
    "resolve_backend",
    "rkd_loss",
    "similarity_preserving_loss",
]
