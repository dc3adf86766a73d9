"""The fused C++ CPU kernel on skew_kl, skew_reverse_kl, akl and alpha_beta (codes 4-7)
against the independent float64 oracle (tests/oracle.py).

Rows and both gradients in float32 (1e-5 relative, or twice the eager float32 formula's error
where float32 cannot do better) and bf16 (twice the eager bf16 error, and within float32 error
plus one rounding), with and without a target, vocabularies that end in a partial vector,
softcap, the terms buffer, mixed student / teacher dtypes, the in-place student gradient, the
bad-parameter checks and opcheck with a new code. This process runs the widest kernel build
the CPU allows; the AVX2 and portable builds are run in subprocesses.
"""

from __future__ import annotations

import kernel_checks
import native_checks
import pytest
import torch
from kernel_checks import NEW_DIVERGENCE_CASES, NEW_DIVERGENCE_IDS, inputs, op_args, oracle_rows

native = pytest.importorskip("fastkd.ops.native", reason="the extension fastkd._C is not built")
pytestmark = pytest.mark.skipif(not native.HAS_CPU,
                                reason=f"no CPU kernel: {native.MISSING_REASON}")
KERNEL = native.dense_kd_native


def run_op(student, teacher, target, **kw):
    return kernel_checks.run_raw(KERNEL, student, teacher, target, **kw)


@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
@pytest.mark.parametrize("vocab", [7, 1000, 4097])
@pytest.mark.parametrize("divergence,options", NEW_DIVERGENCE_CASES, ids=NEW_DIVERGENCE_IDS)
def test_float32(divergence, options, vocab, with_target):
    student, teacher, target = inputs(5, vocab, seed=vocab)
    target = target if with_target else None
    kw = dict(divergence=divergence, label_smoothing=0.1, **options)
    got = run_op(student, teacher, target, **kw)
    exact = oracle_rows(student, teacher, target, **kw)
    eager = oracle_rows(student, teacher, target, torch.float32, **kw)
    kernel_checks.assert_within_float32(got, exact, eager)


@pytest.mark.parametrize("temperature,softcap", [(0.7, None), (2.0, 5.0)])
@pytest.mark.parametrize("divergence,options", NEW_DIVERGENCE_CASES, ids=NEW_DIVERGENCE_IDS)
def test_temperature_and_softcap(divergence, options, temperature, softcap):
    student, teacher, target = inputs(6, 333, seed=4)
    kw = dict(divergence=divergence, temperature=temperature, softcap=softcap, **options)
    got = run_op(student, teacher, target, **kw)
    exact = oracle_rows(student, teacher, target, **kw)
    eager = oracle_rows(student, teacher, target, torch.float32, **kw)
    kernel_checks.assert_within_float32(got, exact, eager)


@pytest.mark.parametrize("divergence,options", NEW_DIVERGENCE_CASES, ids=NEW_DIVERGENCE_IDS)
def test_bf16(divergence, options):
    """bf16 students and teachers: float32 arithmetic, gradients rounded once to bf16."""
    dtype = torch.bfloat16
    student, teacher, target = inputs(5, 1000, dtype=dtype, seed=15)
    kw = dict(divergence=divergence, label_smoothing=0.1, **options)
    got = run_op(student, teacher, target, **kw)
    exact = oracle_rows(student, teacher, target, **kw)
    eager = oracle_rows(student, teacher, target, dtype, **kw)
    for what, k, x, e in zip(kernel_checks.OUTPUTS, got, exact, eager):
        err, scale = kernel_checks.max_error(k, x)
        eager_err, _ = kernel_checks.max_error(e, x)
        assert err <= 2 * eager_err + 1e-6 * scale, f"{what}: {err:.3e} vs eager {eager_err:.3e}"
        rounding = torch.finfo(dtype).eps / 2 * x.abs() if what != "rows" else 0.0
        excess = ((k.double() - x).abs() - rounding).max().item()
        assert excess <= 1e-5 * scale, f"{what}: {excess:.3e} beyond rounding"


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.bfloat16)],
                         ids=["fp32", "bf16-fp32", "fp32-bf16"])
@pytest.mark.parametrize("divergence,options", NEW_DIVERGENCE_CASES, ids=NEW_DIVERGENCE_IDS)
def test_terms_and_mixed_dtypes(divergence, options, dtypes):
    student, teacher, target = native_checks.mixed_inputs(6, 517, *dtypes, seed=9)
    kw = dict(divergence=divergence, temperature=2.0, label_smoothing=0.1, **options)
    native_checks.check_against_oracle(KERNEL, student, teacher, target, **kw)
    native_checks.check_terms(KERNEL, student, teacher, target, **kw)


@pytest.mark.parametrize("divergence,options", NEW_DIVERGENCE_CASES, ids=NEW_DIVERGENCE_IDS)
def test_inplace_student_gradient(divergence, options):
    student, teacher, target = inputs(4, 300, seed=11)
    kw = dict(divergence=divergence, **options)
    fresh = run_op(student, teacher, target, **kw)
    inplace = run_op(student, teacher, target, inplace=True, **kw)
    for what, a, b in zip(kernel_checks.OUTPUTS, fresh, inplace):
        assert torch.equal(a, b), what


def test_skew_zero_and_alpha_beta_near_limits_match_kl():
    student, teacher, target = inputs(4, 300, seed=12)
    for skewed, plain in (("skew_kl", "kl"), ("skew_reverse_kl", "reverse_kl")):
        a = run_op(student, teacher, target, divergence=skewed, skew=0.0)
        b = run_op(student, teacher, target, divergence=plain)
        for what, x, y in zip(kernel_checks.OUTPUTS, a, b):
            kernel_checks.assert_close(x, y, 1e-5, what=f"{skewed} {what}")
    near = run_op(student, teacher, target, divergence="alpha_beta", alpha_beta=(1.0, 0.005))
    kl = run_op(student, teacher, target, divergence="kl")
    kernel_checks.assert_close(near[0], kl[0], 0.03, what="alpha_beta (1, 0.005) rows vs kl")


@pytest.mark.parametrize("code,param_a,param_b,match", [
    (4, 1.0, 0.0, "skew"), (5, -0.1, 0.0, "skew"), (7, 0.0, 0.5, "alpha_beta"),
    (7, 0.5, -1.0, "alpha_beta"), (8, 0.0, 0.0, "divergence")])
def test_bad_parameters_raise(code, param_a, param_b, match):
    student, teacher, target = inputs(2, 9)
    args = kernel_checks.VALID_ARGS._replace(divergence=code, param_a=param_a, param_b=param_b)
    with pytest.raises(ValueError, match=match):
        KERNEL(student, teacher, target, None, None, None, args)


def test_opcheck_new_codes():
    student, teacher, target = inputs(4, 37, seed=20)
    op = torch.ops.fastkd.dense_kd.default
    for divergence, options in (("akl", {}), ("alpha_beta", dict(alpha_beta=(0.5, 0.5)))):
        torch.library.opcheck(op, op_args(student, teacher, target, torch.empty_like(student),
                                          torch.empty_like(teacher), divergence=divergence,
                                          **options))


VARIANT_SCRIPT = """
import kernel_checks
from kernel_checks import NEW_DIVERGENCE_CASES, inputs, oracle_rows
import fastkd.ops.native as native
for divergence, options in NEW_DIVERGENCE_CASES:
    student, teacher, target = inputs(5, 517, seed=3)
    kw = dict(divergence=divergence, label_smoothing=0.1, **options)
    got = kernel_checks.run_raw(native.dense_kd_native, student, teacher, target, **kw)
    exact = oracle_rows(student, teacher, target, **kw)
    eager = oracle_rows(student, teacher, target, torch.float32, **kw)
    kernel_checks.assert_within_float32(got, exact, eager)
print("variant-ok")
"""


@pytest.mark.parametrize("variant", ["default", "avx2"])
def test_other_cpu_builds(variant):
    native_checks.check_cpu_variant(VARIANT_SCRIPT, variant)
