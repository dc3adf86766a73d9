"""fastkd: fused, memory-lean knowledge-distillation losses for PyTorch."""

from . import (
    _dtensor,  # noqa: F401  registers the DTensor routes with _dispatch
    data,  # fastkd.data: the top-k store, its writer and collator
)
from ._dispatch import BackendUnavailableError, resolve_backend
from .functional import (
    distillation_loss,
    fused_linear_distillation_loss,
    fused_linear_sparse_distillation_loss,
    sparse_distillation_loss,
)
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
from .modules import DistillationLoss, FusedLinearDistillationLoss, SparseDistillationLoss
from .topk import topk_teacher_logprobs, topk_teacher_logprobs_from_logits

__version__ = "0.1.0"

__all__ = [
    "AttentionTransferLoss",
    "BackendUnavailableError",
    "DecoupledKDLoss",
    "DistillationLoss",
    "FusedLinearDistillationLoss",
    "HiddenStateLoss",
    "HintLoss",
    "MultiTeacherDistillationLoss",
    "RKDLoss",
    "SparseDistillationLoss",
    "attention_map_loss",
    "attention_transfer_loss",
    "decoupled_kd_loss",
    "distillation_loss",
    "fused_linear_distillation_loss",
    "fused_linear_sparse_distillation_loss",
    "hidden_state_loss",
    "hint_loss",
    "multi_teacher_distillation_loss",
    "resolve_backend",
    "rkd_loss",
    "similarity_preserving_loss",
    "sparse_distillation_loss",
    "topk_teacher_logprobs",
    "topk_teacher_logprobs_from_logits",
    "data",
]
