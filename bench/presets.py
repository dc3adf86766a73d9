"""Named sets of benchmark measurements (`fastkd bench --preset NAME`).

Every preset times the Hinton loss with a target (T=2, alpha=0.5, mean over tokens) in the
fwd+bwd mode of a training step:

- ``cpu-goals``: the dense loss at N=2048, V=32000, the fused lm-head loss at N=8192,
  V=32000, Hs=Ht=256, and the top-k teacher loss at N=2048, V=32000, k=64, float32, against
  eager PyTorch and torch.compile.
- ``gpu-goals``: bfloat16 on one CUDA GPU. The dense loss at N=8192, V=128256 (byte floor
  3*N*V*2 bytes = 6.3 GB); the fused lm-head loss at the 8B -> 1B shape (Hs=2048, Ht=4096,
  V=128256) at N = 1024, 4096 and 8192 (Liger-Kernel's fused JSD is reported to lose to
  unfused PyTorch below about 4096 rows, Liger-Kernel issue #1352, so the sweep shows where
  each provider wins); and the top-k teacher loss at N=8192, V=128256, k=64. Peers:
  eager PyTorch, torch.compile, Liger-Kernel and Cut Cross-Entropy where installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from .providers import LossOptions, Shape

PRESETS = ("cpu-goals", "gpu-goals")
GPU_FUSED_LINEAR_N = (1024, 4096, 8192)
GPU_VOCAB = 128256


@dataclass(frozen=True)
class Job:
    """One loss over a set of providers, modes, dtypes and shapes."""

    loss: str
    providers: tuple
    modes: tuple
    dtypes: tuple
    shapes: tuple
    options: LossOptions = LossOptions()


def preset_jobs(name: str) -> List[Job]:
    """The jobs of preset `name` (one of `PRESETS`).

    Parameters
    ----------
    name : str
        "cpu-goals" or "gpu-goals".

    Returns
    -------
    list of Job
        In the order they run; within a job torch.compile comes last (its compile time
        must not delay the other rows of a time-limited run).
    """
    fp32, bf16 = (torch.float32,), (torch.bfloat16,)
    if name == "cpu-goals":
        return [
            Job("distillation", ("eager", "compile", "cpu", "torch"), ("fwd+bwd",), fp32,
                (Shape(2048, 32000),)),
            Job("fused_linear_distillation", ("eager", "cpu", "torch"), ("fwd+bwd",), fp32,
                (Shape(8192, 32000, 256, 256),)),
            Job("sparse_distillation", ("eager", "compile", "cpu", "torch"), ("fwd+bwd",),
                fp32, (Shape(2048, 32000, k=64),)),
        ]
    if name == "gpu-goals":
        fused_linear_shapes = tuple(Shape(n, GPU_VOCAB, 2048, 4096) for n in GPU_FUSED_LINEAR_N)
        return [
            Job("distillation", ("triton", "cuda", "eager", "liger", "torch", "compile"),
                ("fwd+bwd",), bf16, (Shape(8192, GPU_VOCAB),)),
            Job("fused_linear_distillation",
                ("triton", "cuda", "eager", "liger", "cce", "torch", "compile"),
                ("fwd+bwd",), bf16, fused_linear_shapes),
            Job("sparse_distillation", ("triton", "cuda", "eager", "torch", "compile"),
                ("fwd+bwd",), bf16, (Shape(8192, GPU_VOCAB, k=64),)),
        ]
    raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
