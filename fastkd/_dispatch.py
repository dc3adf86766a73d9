"""Dispatch: which kernel computes a loss for given tensors, and whether a call is a DTensor's.

One function, `kernel_for(family, backend, *tensors)`, serves every loss family ("dense":
student and teacher logits; "topk": a stored top-k teacher) with one set of rules: `"auto"`
(or the `FASTKD_BACKEND` environment variable, which overrides it) picks, for float64 inputs
(on either side), the reference (`"torch"`); for CUDA tensors `"triton"`, then `"cuda"`, then
`"torch"`; for CPU tensors the fused C++ kernel `"cpu"`, then `"torch"`, skipping a backend
that has no kernel of the family. An explicitly named backend that cannot serve the call
raises `BackendUnavailableError` with the reason; nothing falls back silently.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import torch

#: The loss families and the backends that have a kernel for each.
FAMILIES = {"dense": ("triton", "cuda", "cpu", "torch"), "topk": ("triton", "cpu", "torch")}
#: The divergences every kernel of every family serves; the newer ones (skew_kl,
#: skew_reverse_kl, akl, alpha_beta) only where `NEWER_DIVERGENCES` says.
CLASSIC_DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
NEWER_DIVERGENCES = {("dense", "cpu"), ("dense", "torch")}


def serves(family: str, backend: str, divergence: str) -> bool:
    """Whether `backend`'s kernel of `family` computes `divergence`."""
    return divergence in CLASSIC_DIVERGENCES or (family, backend) in NEWER_DIVERGENCES


def check_divergence_served(family: str, divergence: str) -> None:
    """ValueError naming `divergence` when no backend of `family` computes it."""
    served = [b for b in FAMILIES[family] if serves(family, b, divergence)]
    if not served:
        raise ValueError(f"divergence={divergence!r} has no {family} kernel yet (the "
                         f"{family} losses take {CLASSIC_DIVERGENCES}); use the dense losses "
                         "(distillation_loss, fused_linear_distillation_loss) on backend "
                         "'cpu' or 'torch' for it")

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine or these tensors."""


# Import probes, memoised in a plain dict rather than functools.cache: torch.compile traces
# resolve_backend, and Dynamo warns about (and ignores) cache wrappers.
_PROBES: dict = {}


def _memoised(probe):
    def cached():
        if probe.__name__ not in _PROBES:
            _PROBES[probe.__name__] = probe()
        return _PROBES[probe.__name__]

    return cached


@_memoised
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401

        from .ops import triton_dense  # noqa: F401
    except Exception as exc:  # ImportError, or a broken Triton install
        return f"Triton is not importable ({exc})"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@_memoised
def _native_status() -> tuple:
    """(has_cpu_kernels, has_cuda_kernels, reason_if_missing)."""
    try:
        from .ops import native
    except Exception as exc:
        return False, False, f"the native extension fastkd._C is not importable ({exc})"
    return native.HAS_CPU, native.HAS_CUDA, native.MISSING_REASON


@_memoised
def _topk_cpu_status() -> Optional[str]:
    """Why the fused C++ top-k kernel is missing (None when it is built)."""
    try:
        from .ops import sparse_native
    except Exception as exc:  # an extension built without the top-k op
        return f"fastkd._C is not importable ({exc})"
    return None if sparse_native.HAS_CPU else sparse_native.MISSING_REASON


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype,
                       family: str = "dense") -> Optional[str]:
    """Why `backend` cannot run tensors of this device and dtype for a loss of `family`;
    None when it can."""
    if backend in BACKENDS and backend != "auto" and backend not in FAMILIES[family]:
        served = ", ".join(repr(b) for b in FAMILIES[family])
        return f"it has no {family} kernel (the {family} losses run on {served} or 'auto')"
    if backend == "torch":
        return None
    if dtype not in KERNEL_DTYPES:
        return (f"backend {backend!r} takes float32, bfloat16 or float16, not {dtype} "
                "(float64 on either side is computed by backend='torch', which 'auto' picks)")
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            return ("backend 'triton' needs CUDA tensors (or CPU tensors with "
                    f"TRITON_INTERPRET=1), got device {device}")
        return _triton_import_error()
    has_cpu, has_cuda, reason = _native_status()
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got device {device}"
        if not has_cpu:
            return reason
        return _topk_cpu_status() if family == "topk" else None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got device {device}"
        return None if has_cuda else (reason or "fastkd._C was built without CUDA kernels")
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_backend_name(backend) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, tensor: torch.Tensor, *others: torch.Tensor,
                    family: str = "dense", divergence: str = "kl") -> str:
    """Returns the concrete backend name for the tensors' device and dtypes.

    Every tensor given (e.g. student and teacher logits) must be runnable by the backend:
    `"auto"` picks the first candidate that runs all of them and has a kernel of `family`
    (so float64 on either side routes to `"torch"`); an explicit backend that cannot run one
    of them raises `BackendUnavailableError` naming the dtype, device or missing kernel.
    """
    check_backend_name(backend)
    if backend == "auto":
        override = os.environ.get("FASTKD_BACKEND", "auto")
        if override not in BACKENDS:
            raise ValueError(f"FASTKD_BACKEND must be one of {BACKENDS}, got {override!r}")
        backend = override
    device = tensor.device
    dtypes = [tensor.dtype] + [t.dtype for t in others if t is not None]

    def reason_for(candidate: str) -> Optional[str]:
        if not serves(family, candidate, divergence):
            return (f"its {family} kernel does not compute divergence={divergence!r} (served "
                    "by: " + ", ".join(repr(b) for b in FAMILIES[family]
                                      if serves(family, b, divergence)) + ")")
        for dtype in dtypes:
            reason = unavailable_reason(candidate, device, dtype, family)
            if reason is not None:
                return reason
        return None

    if backend == "auto":
        preference = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        for candidate in preference:
            if reason_for(candidate) is None:
                return candidate
        return "torch"
    reason = reason_for(backend)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
    return backend


def _kernel(family: str, name: str) -> Callable:
    """The kernel (contract of `fastkd._kernel_args`) of a resolved backend."""
    if family == "topk":
        if name == "triton":
            from .ops.sparse_triton import sparse_kd_triton

            return sparse_kd_triton
        if name == "cpu":
            from .ops.sparse_native import sparse_kd_native

            return sparse_kd_native
        from .reference.sparse import sparse_kd_rows

        return sparse_kd_rows
    if name == "torch":
        from .reference import dense_kd_rows

        return dense_kd_rows
    if name == "triton":
        from .ops.triton_dense import dense_kd_triton

        return dense_kd_triton
    from .ops.native import dense_kd_native

    return dense_kd_native


def kernel_for(family: str, backend: str, tensor: torch.Tensor,
               *others: Optional[torch.Tensor], divergence: str = "kl") -> Callable:
    """The kernel of `family` ("dense" or "topk") that `backend` resolves to for these
    tensors and `divergence` (`resolve_backend`'s rules); raises `BackendUnavailableError`
    when an explicitly named backend cannot serve the call, ValueError when no backend of
    the family computes the divergence."""
    check_divergence_served(family, divergence)
    return _kernel(family, resolve_backend(backend, tensor, *others, family=family,
                                           divergence=divergence))


#: DTensor routes by loss ("logits", "fused_linear"), registered by `fastkd._dtensor` when
#: `fastkd` is imported. The routing module imports the public functions and registers its
#: entry points here, so the functions reach it without importing it (no import cycle).
_DTENSOR_ROUTES: dict = {}


def register_dtensor_route(loss: str, route: Callable) -> None:
    """Registers the function that computes `loss` for DTensor arguments."""
    _DTENSOR_ROUTES[loss] = route


def dtensor_route(loss: str) -> Callable:
    """The registered DTensor route of `loss` (see `register_dtensor_route`)."""
    try:
        return _DTENSOR_ROUTES[loss]
    except KeyError:
        raise RuntimeError(f"no DTensor route for {loss!r} is registered: import fastkd "
                           "(the package) rather than one of its modules alone") from None


def is_dtensor(*tensors) -> bool:
    """Whether any tensor is a DTensor; free (no import) when torch.distributed.tensor was
    never imported, since no DTensor can exist then (False while compiling)."""
    if torch.compiler.is_compiling():
        return False
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None) if module is not None else None
    return cls is not None and any(isinstance(t, cls) for t in tensors)
