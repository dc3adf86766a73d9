"""The fused C++ CPU backend (`fastkd::dense_kd` on CPU) against the independent float64 oracle.

Raw op calls are checked row by row (loss rows and d sum(rows) / d logits, gradient buffers
poisoned with NaN first); the public API `fastkd.distillation_loss(..., backend="cpu")` end to
end, under torch.compile(fullgraph=True) too. Tolerances (docs/semantics.md §10): float32
within 1e-5 (max-norm relative) of the oracle; bf16 / fp16 within twice the error of the same-dtype
eager formula, and also within the rounding of the float32 result to the input dtype. This
process runs the widest kernel build the CPU allows (AVX-512 on CPUs that have it); the
portable and AVX2 builds are checked in subprocesses with ATEN_CPU_CAPABILITY=default / avx2.
"""

from __future__ import annotations

import math

import kernel_checks
import native_checks
import pytest
import torch
from kernel_checks import (
    DIVERGENCE_CASES,
    DIVERGENCE_IDS,
    assert_close,
    inputs,
    op_args,
    oracle_rows,
)
from oracle import oracle_with_grads, row_weights

import fastkd
from fastkd._dispatch import resolve_backend

native = pytest.importorskip("fastkd.ops.native", reason="the extension fastkd._C is not built")
pytestmark = pytest.mark.skipif(not native.HAS_CPU,
                                reason=f"no CPU kernel: {native.MISSING_REASON}")

LOW_PRECISION = [torch.bfloat16, torch.float16]


def run_op(student, teacher, target, **kw):
    """Raw op: (rows, grad_student or None, grad_teacher or None), grads poisoned first."""
    return kernel_checks.run_raw(native.dense_kd_native, student, teacher, target, **kw)


def check_op(student, teacher, target, rtol=1e-5, atol=None, **kw):
    """Raw op vs oracle on rows and both gradients; returns the op outputs."""
    return kernel_checks.check_raw_kernel(run_op, student, teacher, target, rtol, atol, **kw)


@pytest.mark.parametrize("vocab", [1, 7, 1000, 4097])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_divergences_and_vocab_sizes(divergence, beta, vocab):
    student, teacher, target = inputs(5, vocab, seed=vocab)
    target[1] = -100
    # V=1: every term cancels to 0 up to rounding of |z| ~ 3 (an absolute floor).
    atol = 1e-5 if vocab == 1 else None
    check_op(student, teacher, target, atol=atol, divergence=divergence, beta=beta,
             label_smoothing=0.1)


@pytest.mark.parametrize("vocab", [32000, 31999])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_llm_vocabulary(divergence, beta, vocab):
    """V = 32000 (a Llama-2 vocabulary) and 31999 (a partial last vector): long rows, several
    rows per thread."""
    student, teacher, target = inputs(3, vocab, seed=11)
    check_op(student, teacher, target, divergence=divergence, beta=beta, label_smoothing=0.05)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_large_gradient_buffers(divergence):
    """17 MiB gradients: the kernel streams them past the caches and asks for huge pages."""
    student, teacher, target = inputs(136, 32768, seed=23)
    rows, gs, gt = check_op(student, teacher, target, divergence=divergence)
    rows_i, gs_i, gt_i = run_op(student, teacher, target, inplace=True, divergence=divergence)
    assert torch.equal(rows_i, rows) and torch.equal(gs_i, gs) and torch.equal(gt_i, gt)


def test_rows_split_across_threads():
    """64 rows of 1000: at::parallel_for splits them into several tasks."""
    student, teacher, target = inputs(64, 1000, seed=12)
    check_op(student, teacher, target, divergence="jsd")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0, 4.5])
def test_temperatures(temperature):
    """T = 1 and T = 2 reuse the student's exponentials for CE; other T compute a third one."""
    student, teacher, target = inputs(4, 600, seed=2)
    cases = [("kl", {}), ("reverse_kl", {})] if temperature < 1.0 else \
        [(d, dict(beta=b)) for d, b in DIVERGENCE_CASES] + kernel_checks.NEW_DIVERGENCE_CASES
    for divergence, options in cases:
        check_op(student, teacher, target, divergence=divergence, temperature=temperature,
                 alpha=0.4, label_smoothing=0.2, **options)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_low_temperature_float32(divergence, beta):
    """T = 0.5: jsd / tvd gradients are differences of O(1) sums that cancel, so float32
    itself cannot always reach 1e-5: held to 1e-5 or twice the eager float32 error."""
    student, teacher, target = inputs(4, 600, seed=3)
    kernel_checks.check_low_temperature(run_op, student, teacher, target,
                                        divergence=divergence, beta=beta, label_smoothing=0.1)


def test_jsd_near_one_hot():
    kernel_checks.check_jsd_near_one_hot(run_op, inputs)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_softcap(divergence, beta):
    student, teacher, target = inputs(4, 700, scale=8.0, seed=4)
    check_op(student, teacher, target, divergence=divergence, beta=beta, softcap=5.0,
             label_smoothing=0.1)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_label_smoothing(label_smoothing):
    student, teacher, target = inputs(6, 513, seed=6)
    for alpha in (0.3, 1.0):
        check_op(student, teacher, target, alpha=alpha, label_smoothing=label_smoothing)


@pytest.mark.parametrize("student_padded", [False, True], ids=["student-finite", "padded"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_neg_inf_columns(divergence, beta, student_padded):
    kernel_checks.skip_infinite_reverse_kl(divergence, student_padded)
    student, teacher, _ = inputs(4, 1001, seed=5)
    mask = kernel_checks.masked_columns(4, 1001, seed=5)
    student, teacher = kernel_checks.mask_logits(student, teacher, mask, student_padded)
    target = torch.zeros(4, dtype=torch.int64)  # column 0 is never masked
    target[2] = -100
    _, gs, gt = check_op(student, teacher, target, divergence=divergence, beta=beta)
    kernel_checks.assert_masked_gradients_zero(gs, gt, mask, student_padded)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_extreme_logits(divergence, beta, temperature):
    """|z| ~ 1e4: exponentials underflow to exactly 0 for most columns; no NaN, no inf."""
    student, teacher, target = inputs(4, 777, scale=1e4, seed=7)
    check_op(student, teacher, target, divergence=divergence, beta=beta,
             temperature=temperature, label_smoothing=0.1)


@pytest.mark.parametrize("ignore_fraction", [0.0, 0.5, 1.0])
def test_ignored_rows(ignore_fraction):
    student, teacher, target = inputs(16, 300, ignore_fraction=ignore_fraction, seed=8)
    target = torch.where(target == -100, torch.full_like(target, -7), target)
    rows, gs, gt = check_op(student, teacher, target, ignore_index=-7)
    kernel_checks.assert_ignored_rows_zero(rows, gs, gt, target == -7)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_no_target(divergence, beta):
    student, teacher, _ = inputs(5, 257, seed=9)
    check_op(student, teacher, None, divergence=divergence, beta=beta)


def test_zero_weight_term_is_not_evaluated():
    """alpha = 1 (no divergence): an all -inf teacher would make D NaN, but it is not read.
    alpha = 0: label smoothing over a -inf student column would make CE inf; not evaluated."""
    student, teacher, target = inputs(4, 100, seed=10)
    bad_teacher = torch.full_like(teacher, float("-inf"))
    rows, gs, gt = check_op(student, bad_teacher.nan_to_num(neginf=0.0), target, alpha=1.0)
    rows_bad, gs_bad, gt_bad = run_op(student, bad_teacher, target, alpha=1.0)
    assert torch.equal(rows_bad, rows) and torch.equal(gs_bad, gs)
    assert bool((gt_bad == 0).all())
    padded = student.clone()
    padded[:, 50:] = float("-inf")
    teacher_padded = teacher.clone()
    teacher_padded[:, 50:] = float("-inf")
    target = target.clamp(0, 49)
    check_op(padded, teacher_padded, target, alpha=0.0, label_smoothing=0.3)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_forward_only_and_single_gradient(divergence, beta):
    student, teacher, target = inputs(4, 300, seed=13)
    full = run_op(student, teacher, target, divergence=divergence, beta=beta)
    rows, gs, gt = run_op(student, teacher, target, grad_student=False, grad_teacher=False,
                          divergence=divergence, beta=beta)
    assert gs is None and gt is None and torch.equal(rows, full[0])
    rows, gs, gt = run_op(student, teacher, target, grad_teacher=False, divergence=divergence,
                          beta=beta)
    assert torch.equal(rows, full[0]) and torch.equal(gs, full[1])
    rows, gs, gt = run_op(student, teacher, target, grad_student=False, divergence=divergence,
                          beta=beta)
    assert torch.equal(rows, full[0]) and torch.equal(gt, full[2])


@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_inplace_student_gradient(divergence, beta, dtype):
    """grad_student aliasing student gives the same values as a separate buffer."""
    student, teacher, target = inputs(6, 1003, dtype=dtype, seed=14)
    kw = dict(divergence=divergence, beta=beta, softcap=20.0, label_smoothing=0.1)
    rows, gs, gt = run_op(student, teacher, target, **kw)
    rows_i, gs_i, gt_i = run_op(student, teacher, target, inplace=True, **kw)
    assert torch.equal(rows_i, rows) and torch.equal(gs_i, gs) and torch.equal(gt_i, gt)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("vocab", [7, 1000, 4097])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_low_precision(dtype, divergence, beta, vocab):
    """bf16 / fp16 inputs: float32 arithmetic, gradients rounded once to the input dtype."""
    student, teacher, target = inputs(5, vocab, dtype=dtype, seed=15)
    kw = dict(divergence=divergence, beta=beta, label_smoothing=0.1)
    kernel = run_op(student, teacher, target, **kw)
    exact = oracle_rows(student, teacher, target, **kw)
    eager = oracle_rows(student, teacher, target, dtype, **kw)
    half_ulp = torch.finfo(dtype).eps / 2
    for what, k, x, e in zip(("rows", "student grad", "teacher grad"), kernel, exact, eager):
        err, scale = kernel_checks.max_error(k, x)
        eager_err, _ = kernel_checks.max_error(e, x)
        assert err <= 2 * eager_err + 1e-6 * scale, f"{what}: {err:.3e} vs eager {eager_err:.3e}"
        # Stricter: the only error beyond float32's is the final rounding of each gradient.
        rounding = half_ulp * x.abs() if what != "rows" else 0.0
        excess = ((k.double() - x).abs() - rounding).max().item()
        assert excess <= 1e-5 * scale, f"{what}: {excess:.3e} beyond rounding"


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_properties(divergence, beta):
    """D(p, p) = 0 with zero gradient; D >= 0; JSD <= ln 2; TVD <= 1."""
    student, teacher, _ = inputs(8, 500, seed=16)
    same = run_op(student, student, None, divergence=divergence, beta=beta, temperature=1.5)
    assert same[0].abs().max().item() < 1e-5
    assert same[1].abs().max().item() < 1e-6 and same[2].abs().max().item() < 1e-6
    rows, _, _ = run_op(student * 3, teacher, None, divergence=divergence, beta=beta,
                        scale_by_t2=False, temperature=1.0)
    assert bool((rows >= -1e-6).all())
    if divergence == "jsd":
        assert bool((rows <= math.log(2) + 1e-6).all())
    if divergence == "tvd":
        assert bool((rows <= 1 + 1e-6).all())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_public_api(divergence, beta, reduction):
    student, teacher, target = inputs(12, 999, seed=17)
    student, teacher, target = student.view(3, 4, 999), teacher.view(3, 4, 999), target.view(3, 4)
    kw = dict(temperature=2.5, alpha=0.6, divergence=divergence, beta=beta, reduction=reduction,
              label_smoothing=0.05)
    s, t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    loss = fastkd.distillation_loss(s, t, target, backend="cpu", **kw)
    ref_loss, ref_gs, ref_gt = oracle_with_grads(student, teacher, target, **kw)
    scalar = loss if loss.dim() == 0 else (loss * row_weights(loss.shape).float()).sum()
    scalar.backward()
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, what="loss")
    assert_close(s.grad, ref_gs, what="student grad")
    assert_close(t.grad, ref_gt, what="teacher grad")


def test_public_api_num_items_and_inplace_backward():
    student, teacher, target = inputs(10, 700, seed=18)
    kw = dict(temperature=2.0, alpha=0.5, num_items_in_batch=32)
    ref_loss, ref_gs, _ = oracle_with_grads(student, teacher, target, teacher_grad=False, **kw)
    s = student.clone().requires_grad_(True)
    logits = s * 1.0  # a non-leaf whose buffer the in-place backward may overwrite
    loss = fastkd.distillation_loss(logits, teacher, target, backend="cpu",
                                    inplace_backward=True, **kw)
    loss.backward()
    assert_close(loss, ref_loss, what="loss")
    assert_close(s.grad, ref_gs, what="student grad")


def test_auto_resolves_to_cpu():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_backend("auto", torch.zeros(2, 3, dtype=dtype)) == "cpu"
    assert resolve_backend("auto", torch.zeros(2, 3, dtype=torch.float64)) == "torch"
    assert native.HAS_CPU and native.MISSING_REASON is None


def test_bad_inputs_name_the_argument():
    student, teacher, target = inputs(3, 10, seed=19)
    op = torch.ops.fastkd.dense_kd
    base = op_args(student, teacher, target, None, None)

    def call(**replace):
        names = ["student", "teacher", "target", "grad_student", "grad_teacher", "temperature",
                 "ce_weight", "div_weight", "divergence", "param_a", "param_b", "ignore_index",
                 "label_smoothing", "softcap"]
        args = list(base)
        for k, v in replace.items():
            args[names.index(k)] = v
        return op(*args)

    cases = [
        (ValueError, "teacher", dict(teacher=teacher[:, :5].contiguous())),
        (TypeError, "teacher", dict(teacher=teacher.double())),
        (TypeError, "student", dict(student=student.long(), teacher=teacher.long())),
        (ValueError, "student", dict(student=student[0], teacher=teacher[0])),
        (ValueError, "unit stride", dict(student=student.t().contiguous().t())),
        (TypeError, "target", dict(target=target.int())),
        (ValueError, "target", dict(target=target[:2])),
        (ValueError, "target", dict(target=torch.tensor([0, 10, 1]))),
        (ValueError, "grad_student", dict(grad_student=torch.empty(3, 9))),
        (TypeError, "grad_teacher", dict(grad_teacher=torch.empty(3, 10, dtype=torch.half))),
        (ValueError, "temperature", dict(temperature=0.0)),
        (ValueError, "divergence", dict(divergence=99)),
        (ValueError, "beta", dict(divergence=2, param_a=1.0)),
        (ValueError, "label_smoothing", dict(label_smoothing=1.5)),
    ]
    for error, name, replace in cases:
        with pytest.raises(error, match=name):
            call(**replace)
    with pytest.raises(ValueError, match="target"):
        fastkd.distillation_loss(student, teacher, torch.tensor([0, 10, 1]), backend="cpu")


def test_opcheck():
    student, teacher, target = inputs(4, 37, seed=20)
    op = torch.ops.fastkd.dense_kd.default
    with_grads = op_args(student, teacher, target, torch.empty_like(student),
                         torch.empty_like(teacher), divergence="jsd", softcap=4.0)
    torch.library.opcheck(op, with_grads)
    torch.library.opcheck(op, op_args(student, teacher, None, None, None))
    torch.library.opcheck(op, op_args(student.half(), teacher.half(), target,
                                      torch.empty_like(student.half()), None))
    forward_only = op_args(student, teacher, target, None, None, divergence="tvd")
    torch.library.opcheck(torch.ops.fastkd.dense_kd_loss.default,
                          forward_only[:3] + forward_only[5:])


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_torch_compile_fullgraph(divergence):
    student, teacher, target = inputs(6, 500, seed=21)

    def step(s, t, y):
        return fastkd.distillation_loss(s, t, y, temperature=2.0, alpha=0.4,
                                        divergence=divergence, backend="cpu")

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        s, t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
        loss = fn(s, t, target)
        loss.backward()
        results.append((loss.detach(), s.grad, t.grad))
    (eager_loss, eager_gs, eager_gt), (comp_loss, comp_gs, comp_gt) = results
    # The kernel is the same; only the compiled reduction may round differently.
    assert_close(comp_loss, eager_loss, rtol=1e-6, what="compiled loss")
    assert_close(comp_gs, eager_gs, rtol=1e-6, what="compiled student grad")
    assert_close(comp_gt, eager_gt, rtol=1e-6, what="compiled teacher grad")
    ref_loss, ref_gs, ref_gt = oracle_with_grads(student, teacher, target, temperature=2.0,
                                                 alpha=0.4, divergence=divergence)
    assert_close(comp_loss, ref_loss, what="loss")
    assert_close(comp_gs, ref_gs, what="student grad")


def test_torch_compile_forward_only_and_teacher_only():
    """No gradient buffer (eval under no_grad) and a teacher-only gradient also compile."""
    student, teacher, target = inputs(6, 300, seed=24)

    def loss(s, t, y):
        return fastkd.distillation_loss(s, t, y, temperature=3.0, divergence="reverse_kl",
                                        backend="cpu")

    compiled = torch.compile(loss, fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(student, teacher, target), loss(student, teacher, target),
                     rtol=1e-6, what="no-grad loss")
    t = teacher.clone().requires_grad_(True)
    compiled(student, t, target).backward()
    _, _, ref_gt = oracle_with_grads(student, teacher, target, temperature=3.0,
                                     divergence="reverse_kl")
    assert_close(t.grad, ref_gt, what="teacher grad")


VARIANT_CHECK = """
from test_cpu_dense import check_op, inputs, DIVERGENCE_CASES
for divergence, beta in DIVERGENCE_CASES:
    for dtype in (torch.float32, torch.bfloat16):
        s, t, y = inputs(5, 1001, dtype=dtype, seed=22)
        rtol = 1e-5 if dtype == torch.float32 else 2.0 ** -7
        check_op(s, t, y, rtol=rtol, divergence=divergence, beta=beta, softcap=6.0,
                 label_smoothing=0.1, temperature=1.5)
import kernel_checks
from test_cpu_dense import run_op
kernel_checks.check_jsd_near_one_hot(run_op, inputs)
print("variant-ok")
"""


@pytest.mark.parametrize("variant", native_checks.CPU_VARIANTS)
def test_other_kernel_variants(variant):
    """ATEN_CPU_CAPABILITY=default / avx2 selects the portable / AVX2 build of the kernel
    (checked in the subprocess), which passes the same checks."""
    native_checks.check_cpu_variant(VARIANT_CHECK, variant)


def test_widest_kernel_variant_runs():
    """On a CPU with AVX-512 (ATen's capability AVX512) both CPU kernels run their AVX-512
    build; the op names the build that runs."""
    reason = native_checks.cpu_variant_skip_reason("avx512")
    if reason is not None:
        pytest.skip(reason)
    assert native.cpu_kernel_variant("dense_kd") == "avx512"
    assert native.cpu_kernel_variant("sparse_kd") == "avx512"
    with pytest.raises(ValueError, match="dense_kd"):
        native.cpu_kernel_variant("dense")
