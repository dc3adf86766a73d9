"""The fused C++ CPU kernel (`fastkd::dense_kd` on CPU) on inputs as users hold them.

Every (student dtype, teacher dtype) pair against the float64 oracle with and without the
teacher gradient (each gradient in its input's dtype, float32 arithmetic, one final rounding);
rows read where they are (slices with their own row strides, the causal shift `logits[:, :-1]`
per batch element and a transposed batch, in place); the `terms` output (unweighted CE and
divergence per row) against the oracle and the identity rows == ce_w * CE + div_w * D;
opcheck and torch.compile with the new argument. This process runs the widest kernel build
the CPU allows (AVX-512 where present); the portable and AVX2 builds run the same checks in
subprocesses with ATEN_CPU_CAPABILITY=default / avx2.
"""

from __future__ import annotations

import native_checks
import pytest
import torch
from kernel_checks import DIVERGENCE_CASES, DIVERGENCE_IDS, kernel_args, op_args
from native_checks import DTYPE_PAIR_IDS, DTYPE_PAIRS, DTYPES, mixed_inputs

native = pytest.importorskip("fastkd.ops.native", reason="the extension fastkd._C is not built")
pytestmark = pytest.mark.skipif(not native.HAS_CPU,
                                reason=f"no CPU kernel: {native.MISSING_REASON}")

kernel = native.dense_kd_native


@pytest.mark.parametrize("teacher_grad", [True, False], ids=["teacher-grad", "no-teacher-grad"])
@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
def test_mixed_dtypes(student_dtype, teacher_dtype, teacher_grad):
    """Each side read in its own dtype; every divergence, softcap on the JSD case."""
    student, teacher, target = mixed_inputs(5, 1003, student_dtype, teacher_dtype, seed=31)
    for divergence, beta in DIVERGENCE_CASES:
        native_checks.check_against_oracle(
            kernel, student, teacher, target, grad_teacher=teacher_grad, divergence=divergence,
            beta=beta, label_smoothing=0.1, temperature=1.5,
            softcap=6.0 if divergence == "jsd" else None)


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
def test_mixed_dtypes_long_rows_and_in_place(student_dtype, teacher_dtype):
    """V = 32000 over several threads; the in-place student gradient equals the separate one."""
    student, teacher, target = mixed_inputs(4, 32000, student_dtype, teacher_dtype, seed=32)
    got = native_checks.check_against_oracle(kernel, student, teacher, target, divergence="kl")
    rows, gs, gt, _ = native_checks.run(kernel, student, teacher, target, inplace=True,
                                        divergence="kl")
    assert torch.equal(rows, got[0]) and torch.equal(gs, got[1]) and torch.equal(gt, got[2])


@pytest.mark.parametrize("student_dtype,teacher_dtype",
                         [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                          (torch.float16, torch.bfloat16)], ids=["fp32", "bf16-fp32", "fp16-bf16"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_strided_slices(divergence, beta, student_dtype, teacher_dtype):
    native_checks.check_strided_slices(kernel, student_dtype, teacher_dtype,
                                       divergence=divergence, beta=beta, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_causal_shift_in_place(dtype):
    native_checks.check_causal_shift_in_place(kernel, dtype, divergence="jsd", temperature=2.0)


def test_rows_must_not_overlap_and_columns_must_be_unit_stride():
    student, teacher, target = mixed_inputs(3, 10, torch.float32, torch.float32)
    scalars = op_args(student, teacher, target, None, None)[5:]
    op = torch.ops.fastkd.dense_kd
    with pytest.raises(ValueError, match="student"):
        op(student.t().contiguous().t(), teacher, target, None, None, *scalars)
    with pytest.raises(ValueError, match="teacher"):
        op(student, teacher[:1].expand(3, 10), target, None, None, *scalars)
    with pytest.raises(ValueError, match="grad_teacher"):
        op(student, teacher, target, None, torch.empty(3, 20)[:, ::2], *scalars)
    with pytest.raises(TypeError, match="grad_teacher"):
        op(student, teacher.half(), target, None, torch.empty(3, 10), *scalars)
    with pytest.raises(TypeError, match="grad_student"):
        op(student.bfloat16(), teacher, target, torch.empty(3, 10), None, *scalars)
    with pytest.raises(TypeError, match="teacher"):
        op(student, teacher.double(), target, None, None, *scalars)
    for bad, error in ((torch.empty(3, 2, dtype=torch.float64), TypeError),
                       (torch.empty(3, 3), ValueError), (torch.empty(2, 3).t(), ValueError)):
        with pytest.raises(error, match="terms"):
            op(student, teacher, target, None, None, *scalars, bad)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_terms(divergence, beta):
    """CE and D per row vs the oracle, with a target (ignored rows 0) and without (CE 0)."""
    student, teacher, target = mixed_inputs(7, 999, torch.float32, torch.float32, seed=33)
    kw = dict(divergence=divergence, beta=beta, temperature=2.0, label_smoothing=0.1)
    terms = native_checks.check_terms(kernel, student, teacher, target, alpha=0.3, **kw)
    ignored = target == -100
    assert bool(ignored.any()) and bool((terms[ignored] == 0).all())
    terms = native_checks.check_terms(kernel, student, teacher, None, **kw)
    assert bool((terms[:, 0] == 0).all())


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_terms_with_a_zero_weight(alpha):
    """alpha = 0 (CE weight 0) and alpha = 1 (divergence weight 0): both terms still come."""
    student, teacher, target = mixed_inputs(6, 513, torch.float32, torch.float32, seed=34)
    for divergence in ("kl", "jsd"):
        terms = native_checks.check_terms(kernel, student, teacher, target, alpha=alpha,
                                          divergence=divergence, temperature=3.0)
        live = target != -100
        assert bool((terms[live] > 0).all())


@pytest.mark.parametrize("student_dtype,teacher_dtype",
                         [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                          (torch.float32, torch.float16)], ids=["bf16", "bf16-fp32", "fp32-fp16"])
def test_terms_mixed_dtypes_and_softcap(student_dtype, teacher_dtype):
    student, teacher, target = mixed_inputs(5, 777, student_dtype, teacher_dtype, seed=35)
    native_checks.check_terms(kernel, student, teacher, target, divergence="reverse_kl",
                              softcap=7.0, temperature=1.0)


def test_terms_forward_only_and_strided():
    """Forward-only calls with terms use the mutating op (it has a buffer to mutate)."""
    student, teacher, target, _, _, _ = native_checks.strided_case(5, 600, torch.float32,
                                                                   torch.bfloat16)
    native_checks.check_terms(kernel, student, teacher, target, divergence="tvd")
    rows, gs, gt, terms = native_checks.run(kernel, student, teacher, target, terms=True,
                                            grad_student=False, grad_teacher=False)
    assert gs is None and gt is None and bool(torch.isfinite(terms).all())


def test_opcheck_terms_mixed_dtypes_and_strides():
    student, teacher, target = mixed_inputs(4, 37, torch.bfloat16, torch.float32, seed=36)
    op = torch.ops.fastkd.dense_kd.default
    terms = torch.empty(4, 2)
    args = op_args(student, teacher, target, torch.empty_like(student),
                   torch.empty_like(teacher), divergence="jsd", softcap=4.0)
    torch.library.opcheck(op, args + (terms,))
    torch.library.opcheck(op, op_args(student, teacher, None, None, None) + (terms,))
    s, t, y, gs, gt, _ = native_checks.strided_case(4, 37, torch.float16, torch.float32)
    torch.library.opcheck(op, op_args(s, t, y, gs, gt, divergence="tvd") + (terms,))


def test_torch_compile_with_terms():
    """A forward-only call with a terms buffer traces and compiles with fullgraph=True."""
    student, teacher, target = mixed_inputs(6, 300, torch.bfloat16, torch.float32, seed=37)

    def rows_and_terms(s, t, y):
        terms = torch.empty(s.shape[0], 2, device=s.device)
        rows = kernel(*kernel_args(s, t, y, None, None, terms, divergence="kl", alpha=0.4))
        return rows, terms

    eager = rows_and_terms(student, teacher, target)
    compiled = torch.compile(rows_and_terms, fullgraph=True)(student, teacher, target)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


VARIANT_CHECK = """
import native_checks
from fastkd.ops.native import dense_kd_native as kernel
for sd, td in native_checks.DTYPE_PAIRS:
    s, t, y = native_checks.mixed_inputs(4, 1001, sd, td, seed=38)
    for div in ("kl", "jsd", "tvd"):
        native_checks.check_against_oracle(kernel, s, t, y, divergence=div, softcap=6.0,
                                           label_smoothing=0.1)
native_checks.check_strided_slices(kernel, torch.bfloat16, torch.float32, divergence="jsd")
native_checks.check_causal_shift_in_place(kernel, torch.float16, divergence="reverse_kl")
s, t, y = native_checks.mixed_inputs(5, 300, torch.float32, torch.bfloat16, seed=39)
native_checks.check_terms(kernel, s, t, y, alpha=0.0, divergence="jsd")
print("variant-ok")
"""


@pytest.mark.parametrize("variant", native_checks.CPU_VARIANTS)
def test_other_kernel_variants(variant):
    """ATEN_CPU_CAPABILITY=default / avx2 selects the portable / AVX2 build of the kernel
    (checked in the subprocess), which passes the same checks."""
    native_checks.check_cpu_variant(VARIANT_CHECK, variant)
