"""Benchmark providers: who computes each loss, on which inputs, and why one may be skipped.

Every provider is a callable `fn(inputs) -> scalar loss` over an inputs dict made by
`make_inputs`. The loss benchmarked is the Hinton loss with a target,
`alpha * CE(s, y) + (1 - alpha) * T^2 * KL(p_t || p_s)`, mean over tokens, unless a peer
offers only a nearer-but-different equivalent (`PEER_NOTES` says which, and the CLI prints it).

Providers:
- fastkd backends `torch` (reference), `cpu` (fused C++), `triton`, `cuda`: the public
  function with `backend=<name>`; run where `fastkd._dispatch.unavailable_reason` allows.
  The Triton interpreter (`TRITON_INTERPRET=1`) is never benchmarked.
- `eager`: the textbook formula in PyTorch, in the input dtype (no upcast), as in a training
  script: `F.log_softmax`, `F.kl_div(..., log_target=True, reduction="batchmean")`,
  `F.cross_entropy`.
- `compile`: the same eager function under `torch.compile` (dynamo reset per case, so a
  shape sweep never hits the recompile limit and silently falls back to eager).
- `liger`, `cce`: Liger-Kernel and Cut Cross-Entropy, GPU only and when importable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

LOSSES = ("distillation", "fused_linear_distillation", "sparse_distillation")
FASTKD_BACKENDS = ("torch", "cpu", "triton", "cuda")
PEERS = ("eager", "compile", "liger", "cce")
PROVIDERS = FASTKD_BACKENDS + PEERS
CPU_PROVIDERS = ("torch", "cpu", "eager", "compile")
FASTKD_FUNCTION = {
    "distillation": "distillation_loss",
    "fused_linear_distillation": "fused_linear_distillation_loss",
    "sparse_distillation": "sparse_distillation_loss",
}
GRAD_LEAVES = {
    "distillation": ("student",),
    "fused_linear_distillation": ("student_hidden", "student_weight"),
    "sparse_distillation": ("student",),
}
#: Standard deviation of the random logits: the order of real LM logits (never zeros).
LOGIT_SCALE = 2.0

PEER_NOTES = {
    ("distillation", "eager"): "textbook PyTorch: log_softmax, kl_div(log_target, batchmean) "
                               "* T^2, cross_entropy; input dtype",
    ("distillation", "liger"): "Liger-Kernel: LigerKLDIVLoss(log_target=True) on "
                               "log_softmax(z/T) of both + LigerCrossEntropyLoss; T^2 and "
                               "alpha applied outside",
    ("fused_linear_distillation", "eager"): "textbook PyTorch: both lm-heads as matmuls, "
                                            "then the dense textbook loss",
    ("fused_linear_distillation", "liger"): "Liger-Kernel: LigerFusedLinearJSD (generalized "
                                            "JSD, beta=0.5, temperature T); no CE term, no "
                                            "T^2 (its nearest KD equivalent)",
    ("fused_linear_distillation", "cce"): "Cut Cross-Entropy: linear_cross_entropy, the "
                                          "hard-label CE only (CCE has no distillation term)",
    ("sparse_distillation", "eager"): "textbook PyTorch: full-vocabulary log_softmax of the "
                                      "student gathered at the teacher's top-k, teacher "
                                      "renormalised over k (tail='renormalize')",
}


@dataclass(frozen=True)
class Shape:
    """Problem size: tokens n, vocabulary v; hidden sizes (fused-linear) or top-k (sparse)."""

    n: int
    v: int
    hs: int = 0
    ht: int = 0
    k: int = 0


@dataclass(frozen=True)
class LossOptions:
    temperature: float = 2.0
    alpha: float = 0.5


# --- inputs --------------------------------------------------------------------------------

def _randn(shape, generator, device, dtype, scale=1.0) -> torch.Tensor:
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return (x * scale).to(dtype)


def make_inputs(loss: str, shape: Shape, dtype: torch.dtype, device: torch.device,
                options: LossOptions, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Fresh random inputs for `loss` (normal logits of scale LOGIT_SCALE, never zeros).

    Parameters
    ----------
    loss : str
        One of `LOSSES`.
    shape : Shape
        n tokens, v vocabulary; hs / ht hidden sizes (fused-linear) or k (sparse).
    dtype : torch.dtype
        Of the logits / hidden states / weights / top-k values (labels are int64).
    device : torch.device
    options : LossOptions
        The temperature the sparse loss's top-k log-probabilities are taken at.
    seed : int

    Returns
    -------
    dict of str to Tensor
        Keyed by `ARGUMENTS[loss]`; the tensors of `GRAD_LEAVES[loss]` require grad.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    n, v = shape.n, shape.v
    target = torch.randint(0, v, (n,), generator=g, device=device)
    if loss == "distillation":
        inputs = {"student": _randn((n, v), g, device, dtype, LOGIT_SCALE),
                  "teacher": _randn((n, v), g, device, dtype, LOGIT_SCALE), "target": target}
    elif loss == "fused_linear_distillation":
        inputs = {
            "student_hidden": _randn((n, shape.hs), g, device, dtype),
            "student_weight": _randn((v, shape.hs), g, device, dtype, LOGIT_SCALE / shape.hs**.5),
            "teacher_hidden": _randn((n, shape.ht), g, device, dtype),
            "teacher_weight": _randn((v, shape.ht), g, device, dtype, LOGIT_SCALE / shape.ht**.5),
            "target": target,
        }
    elif loss == "sparse_distillation":
        teacher = torch.randn((n, v), generator=g, device=device) * LOGIT_SCALE
        logprobs = torch.log_softmax(teacher / options.temperature, dim=-1)
        values, indices = logprobs.topk(shape.k, dim=-1)
        del teacher, logprobs
        inputs = {"student": _randn((n, v), g, device, dtype, LOGIT_SCALE),
                  "topk_logprobs": values.to(dtype), "topk_indices": indices, "target": target}
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for name in GRAD_LEAVES[loss]:
        inputs[name].requires_grad_(True)
    return inputs


def clear_grads(loss: str, inputs: Dict[str, torch.Tensor]) -> None:
    for name in GRAD_LEAVES[loss]:
        inputs[name].grad = None


def inputs_nbytes(inputs: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values())


# --- textbook formulas (eager and compile providers) ---------------------------------------

def eager_dense_loss(student, teacher, target, temperature: float, alpha: float):
    """(N, V), (N, V), (N,) -> scalar: alpha * CE + (1 - alpha) * T^2 * KL(p_t || p_s)."""
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)
    kd = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student, target)
    return alpha * ce + (1.0 - alpha) * temperature * temperature * kd


def eager_fused_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                            target, temperature: float, alpha: float):
    """(N, Hs), (V, Hs), (N, Ht), (V, Ht), (N,) -> scalar: lm-heads, then the dense loss."""
    student = student_hidden @ student_weight.t()
    teacher = teacher_hidden @ teacher_weight.t()
    return eager_dense_loss(student, teacher, target, temperature, alpha)


def eager_sparse_loss(student, topk_logprobs, topk_indices, target, temperature: float,
                      alpha: float):
    """(N, V), (N, k), (N, k), (N,) -> scalar: KL of the teacher renormalised over its k
    entries against the student's full-vocabulary log-softmax at those entries."""
    log_q = F.log_softmax(student / temperature, dim=-1).gather(-1, topk_indices)
    log_p = F.log_softmax(topk_logprobs, dim=-1)
    kd = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    ce = F.cross_entropy(student, target)
    return alpha * ce + (1.0 - alpha) * temperature * temperature * kd


EAGER = {"distillation": eager_dense_loss, "fused_linear_distillation": eager_fused_linear_loss,
         "sparse_distillation": eager_sparse_loss}
ARGUMENTS = {
    "distillation": ("student", "teacher", "target"),
    "fused_linear_distillation": ("student_hidden", "student_weight", "teacher_hidden",
                                  "teacher_weight", "target"),
    "sparse_distillation": ("student", "topk_logprobs", "topk_indices", "target"),
}


# --- availability -------------------------------------------------------------------------

def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # ImportError, or a broken install (e.g. no GPU Triton)
        return False
    return True


def _fastkd_skip_reason(loss, backend, device, dtype) -> Optional[str]:
    import fastkd
    from fastkd._dispatch import unavailable_reason

    if not hasattr(fastkd, FASTKD_FUNCTION[loss]):
        return f"fastkd.{FASTKD_FUNCTION[loss]} does not exist yet"
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the Triton interpreter is a correctness tool, not benchmarked"
    return unavailable_reason(backend, device, dtype)


def skip_reason(loss: str, provider: str, device: torch.device,
                dtype: torch.dtype) -> Optional[str]:
    """Why `provider` cannot run `loss` on `device` in `dtype`.

    Parameters
    ----------
    loss : str
        One of `LOSSES`.
    provider : str
        One of `PROVIDERS`.
    device : torch.device
    dtype : torch.dtype

    Returns
    -------
    str or None
        A sentence for the user (shown as "skipped ..."), or None when it can run.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider in FASTKD_BACKENDS:
        if loss == "sparse_distillation" and provider == "cuda":
            return "fastkd's top-k teacher loss has no CUDA C++ kernel (its GPU kernel is triton)"
        return _fastkd_skip_reason(loss, provider, device, dtype)
    if provider in ("eager", "compile"):
        return None
    if device.type != "cuda":
        return f"{provider} runs on CUDA GPUs only (device here: {device})"
    if provider == "liger":
        if loss == "sparse_distillation":
            return "Liger-Kernel has no top-k (sparse) teacher loss"
        if not _importable("liger_kernel"):
            return "Liger-Kernel is not installed (pip install liger-kernel)"
        return None
    if loss != "fused_linear_distillation":
        return ("Cut Cross-Entropy has no distillation loss and starts from hidden states; "
                "only fused_linear_distillation has an equivalent (its CE)")
    if not _importable("cut_cross_entropy"):
        return "Cut Cross-Entropy is not installed (pip install cut-cross-entropy)"
    return None


def default_providers(device: torch.device) -> tuple:
    return PROVIDERS if device.type == "cuda" else CPU_PROVIDERS


# --- builders -----------------------------------------------------------------------------

def _fastkd_provider(loss: str, backend: str, options: LossOptions) -> Callable:
    import fastkd

    fn = getattr(fastkd, FASTKD_FUNCTION[loss])
    names = ARGUMENTS[loss]
    kwargs = dict(temperature=options.temperature, alpha=options.alpha, backend=backend)
    if loss == "sparse_distillation":
        kwargs["tail"] = "renormalize"  # the eager formula's tail, so both compute one loss
    return lambda x: fn(*(x[k] for k in names), **kwargs)


def _liger_provider(loss: str, options: LossOptions) -> Callable:
    from liger_kernel.transformers import (
        LigerCrossEntropyLoss,
        LigerFusedLinearJSD,
        LigerKLDIVLoss,
    )

    t, a = options.temperature, options.alpha
    if loss == "fused_linear_distillation":
        jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=t)
        return lambda x: jsd(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                             x["teacher_weight"])
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    ce = LigerCrossEntropyLoss()

    def liger_dense(x):
        log_p_s = F.log_softmax(x["student"] / t, dim=-1)
        log_p_t = F.log_softmax(x["teacher"] / t, dim=-1)
        return a * ce(x["student"], x["target"]) + (1 - a) * t * t * kl(log_p_s, log_p_t)

    return liger_dense


def _cce_provider() -> Callable:
    from cut_cross_entropy import linear_cross_entropy

    return lambda x: linear_cross_entropy(x["student_hidden"], x["student_weight"], x["target"])


def build_provider(loss: str, provider: str, options: LossOptions) -> Callable:
    """The callable that computes `loss` the way `provider` does.

    Parameters
    ----------
    loss, provider : str
    options : LossOptions
        Temperature and alpha of the Hinton loss.

    Returns
    -------
    callable
        ``fn(inputs) -> scalar loss`` over a `make_inputs` dict (torch.compile providers are
        compiled on their first call).
    """
    if provider in FASTKD_BACKENDS:
        return _fastkd_provider(loss, provider, options)
    if provider == "liger":
        return _liger_provider(loss, options)
    if provider == "cce":
        return _cce_provider()
    formula, names = EAGER[loss], ARGUMENTS[loss]
    if provider == "compile":
        torch._dynamo.reset()  # fresh cache per case: no recompile limit, no dynamic shapes
        formula = torch.compile(formula, dynamic=False)
    t, a = options.temperature, options.alpha
    return lambda x: formula(*(x[k] for k in names), t, a)


def make_prepare(loss: str, mode: str, fn: Callable) -> Callable:
    """One timed step of `mode` for the timers of `fastkd.bench.timing`.

    Parameters
    ----------
    loss : str
    mode : {"fwd", "bwd", "fwd+bwd"}
    fn : callable
        From `build_provider`.

    Returns
    -------
    callable
        ``prepare(inputs) -> call``: runs the untimed part (clears gradients; for "bwd" the
        forward) and returns the zero-argument callable whose run is timed.
    """
    def prepare(inputs):
        clear_grads(loss, inputs)
        if mode == "fwd":
            return lambda: fn(inputs)
        if mode == "bwd":
            return fn(inputs).backward
        if mode == "fwd+bwd":
            return lambda: fn(inputs).backward()
        raise ValueError(f"mode must be fwd, bwd or fwd+bwd, got {mode!r}")

    return prepare
