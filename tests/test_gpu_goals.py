"""The GPU validation of `make gpu-check`: every GPU kernel backend (triton, cuda) through the
public API against the independent float64 oracle at the sizes that matter on a GPU.

- V = 262144 (the largest vocabularies in use), every divergence, fp32 / bf16 / fp16, with a
  target holding ignored tokens, T = 2, loss rows (reduction="none") and student gradients
  (for TVD the teacher keeps every column away from a tie p_s = p_t, where its gradient
  jumps).
- N * V beyond 2^31 elements in bf16 (N = 8200, V = 262144): 32-bit element offsets would
  wrap there. The whole batch runs through the kernel; the rows around the 2^31 boundary and
  at both ends are checked against the oracle on those rows (rows are independent).

Tolerances (docs/semantics.md §10): fp32 within 1e-5 relative of the oracle (max norm over the
checked values); bf16 / fp16 at most twice the error of the same-dtype eager formula plus one
rounding of the largest value. Outputs of the kernels are fresh tensors; inputs are normal
logits of realistic scale. The same checking code runs on the CPU (`torch` and `cpu` backends,
small sizes, not marked gpu) so that it is exercised in CI too.
"""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_loss

import fastkd
from fastkd._dispatch import unavailable_reason

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HALF_ROUNDING = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
OPTIONS = dict(temperature=2.0, alpha=0.5)
IGNORE = -100


def logits(n: int, v: int, dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(n, v, generator=g, device=device) * 3.0).to(dtype)


def labels(n: int, v: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    y[::5] = IGNORE
    return y


def kernel_rows_and_grad(student, teacher, target, backend, divergence, weights=None):
    """The public loss with reduction="none" and its student gradient of sum(w * rows)
    (w = 1 by default: the kernel's gradient itself, with no rescale rounding)."""
    s = student.detach().clone().requires_grad_(True)
    rows = fastkd.distillation_loss(s, teacher, target, divergence=divergence,
                                    reduction="none", backend=backend, **OPTIONS)
    w = torch.ones_like(rows) if weights is None else weights
    (rows * w).sum().backward()
    return rows.detach(), s.grad


def oracle_rows_and_grad(student, teacher, target, divergence, dtype=torch.float64,
                         weights=None):
    """The oracle's rows and d sum(w * rows) / d student, evaluated in `dtype`."""
    s = student.detach().to(dtype).requires_grad_(True)
    rows = oracle_loss(s, teacher.to(dtype), target, divergence=divergence, reduction="none",
                       dtype=dtype, ignore_index=IGNORE, **OPTIONS)
    w = torch.ones_like(rows) if weights is None else weights.to(dtype)
    (grad,) = torch.autograd.grad((rows * w).sum(), (s,))
    return rows.detach(), grad


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).abs().max())


def assert_within_budget(name, value, reference, eager, dtype) -> None:
    """fp32: 1e-5 relative (max norm), or twice the eager float32 error where float32 itself
    cannot get there (TVD's sign at near-ties, cancelling sums); half: <= 2 * eager error +
    one rounding of max|ref|."""
    assert torch.isfinite(value).all(), f"{name}: non-finite values"
    scale = float(reference.abs().max())
    error = max_error(value, reference)
    if dtype == torch.float32:
        budget = max(1e-5 * scale, 2 * max_error(eager, reference)) + 1e-12
    else:
        budget = 2 * max_error(eager, reference) + HALF_ROUNDING[dtype] * scale
    assert error <= budget, f"{name}: error {error:.3g} > budget {budget:.3g} (scale {scale:.3g})"


def teacher_for(student: torch.Tensor, divergence: str, seed: int) -> torch.Tensor:
    """Independent normal logits; for TVD, whose gradient jumps where p_s = p_t, the student
    shifted by +-1.5 per column (random signs), so that no column is near such a tie and
    rounding cannot flip a sign (ties would make any two correct results differ)."""
    n, v = student.shape
    if divergence != "tvd":
        return logits(n, v, student.dtype, student.device, seed)
    g = torch.Generator(device=student.device).manual_seed(seed)
    signs = torch.randint(0, 2, (n, v), generator=g, device=student.device) * 2.0 - 1.0
    return (student.float() + 1.5 * signs).to(student.dtype)


def check_backend(backend, device, n, v, dtype, divergence, seed=0) -> None:
    student = logits(n, v, dtype, device, seed)
    teacher = teacher_for(student, divergence, seed + 1)
    target = labels(n, v, device, seed + 2)
    rows, grad = kernel_rows_and_grad(student, teacher, target, backend, divergence)
    ref_rows, ref_grad = oracle_rows_and_grad(student, teacher, target, divergence)
    assert rows.dtype == torch.float32 and grad.dtype == dtype
    eager_rows, eager_grad = oracle_rows_and_grad(student, teacher, target, divergence,
                                                  dtype=dtype)
    assert_within_budget(f"{backend} rows", rows, ref_rows, eager_rows, dtype)
    assert_within_budget(f"{backend} grad", grad, ref_grad, eager_grad, dtype)
    ignored = target == IGNORE
    assert torch.all(rows[ignored] == 0) and torch.all(grad[ignored] == 0)


def boundary_rows(n: int, v: int) -> list:
    """Rows whose elements straddle 2^31 (and 2^32 when present), plus both ends."""
    rows = {0, 1, n - 2, n - 1}
    for limit in (2**31, 2**32):
        r = limit // v
        rows.update(x for x in (r - 1, r, r + 1) if 0 <= x < n)
    return sorted(rows)


def check_rows_beyond(backend, device, n, v, dtype, divergence="kl", seed=0) -> None:
    """The full batch through the kernel; boundary rows against the oracle on those rows."""
    student = logits(n, v, dtype, device, seed)
    teacher = logits(n, v, dtype, device, seed + 1)
    target = labels(n, v, device, seed + 2)
    rows, grad = kernel_rows_and_grad(student, teacher, target, backend, divergence)
    picked = torch.tensor(boundary_rows(n, v), device=device)
    s, t, y = student[picked], teacher[picked], target[picked]
    ref_rows, ref_grad = oracle_rows_and_grad(s, t, y, divergence)
    eager_rows, eager_grad = oracle_rows_and_grad(s, t, y, divergence, dtype=dtype)
    assert_within_budget("boundary rows", rows[picked], ref_rows, eager_rows, dtype)
    assert_within_budget("boundary grads", grad[picked], ref_grad, eager_grad, dtype)
    assert torch.isfinite(rows).all()


def gpu_backend(name: str):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = unavailable_reason(name, torch.device("cuda"), torch.bfloat16)
    if reason:
        pytest.skip(reason)
    return name


# --- on the GPU ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_vocab_262144_every_divergence_and_dtype(backend, divergence, dtype):
    check_backend(gpu_backend(backend), "cuda", 24, 262144, dtype, divergence)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_more_than_2_pow_31_elements_bf16(backend):
    n, v = 8200, 262144
    assert n * v > 2**31
    check_rows_beyond(gpu_backend(backend), "cuda", n, v, torch.bfloat16)


# --- the same checks on the CPU (small), so that their code runs in CI ----------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_checks_run_on_cpu_backends(backend, dtype):
    """triton runs here under TRITON_INTERPRET=1 (as in CI), else it is skipped."""
    reason = unavailable_reason(backend, torch.device("cpu"), dtype)
    if reason:
        pytest.skip(reason)
    for divergence in DIVERGENCES:
        check_backend(backend, "cpu", 12, 1003, dtype, divergence)


def test_boundary_rows_cover_the_int32_wrap():
    n, v = 8200, 262144
    rows = boundary_rows(n, v)
    assert {8191, 8192, 8193} <= set(rows) and rows[0] == 0 and rows[-1] == n - 1
    assert any(r * v < 2**31 <= (r + 1) * v for r in rows)
    small = boundary_rows(40, 1000)  # 2^31 out of reach: only the ends
    assert small == [0, 1, 38, 39]


def test_boundary_check_runs_on_cpu():
    check_rows_beyond("torch", "cpu", 40, 1000, torch.bfloat16)


def test_budget_rejects_a_wrong_result():
    reference = torch.linspace(-1.0, 1.0, 50, dtype=torch.float64)
    with pytest.raises(AssertionError, match="budget"):
        assert_within_budget("x", (reference * (1 + 1e-3)).float(), reference,
                             reference.float().double(), torch.float32)
    eager = (reference.bfloat16()).double()
    with pytest.raises(AssertionError, match="budget"):
        assert_within_budget("x", (reference + 0.2).bfloat16(), reference, eager,
                             torch.bfloat16)
