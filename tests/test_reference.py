"""The reference backend (`backend="torch"`) against the independent float64 oracle.

Losses and gradients (student, and teacher when its logits require grad) over divergences,
temperatures, reductions, ignored fractions, -inf columns, extreme logits, leading dimensions,
options, dtypes, vocabulary sizes and the reference's row chunking. Tolerances follow
docs/semantics.md §10: float64 ~1e-12 relative, float32 1e-5 relative, bf16/fp16 at most twice the
error of the same formula evaluated eagerly in that dtype plus a rounding floor.
"""

from __future__ import annotations

import kernel_checks
import pytest
import torch
from kernel_checks import (
    DIVERGENCE_CASES,
    DIVERGENCE_IDS,
    assert_masked_gradients_zero,
    mask_logits,
    masked_columns,
)
from oracle import oracle_loss, oracle_with_grads, random_logits, random_target, row_weights

import fastkd
import fastkd.reference.dense as reference_dense
from fastkd._kernel_args import KernelArgs

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
# Per-element rounding of one value to the dtype (half an ulp at 1.0): the floor of the
# low-precision rule, since a gradient returned in bf16/fp16 can be no closer than that.
HALF_ULP = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}


def run_fastkd(student, teacher, target=None, *, student_grad=True, teacher_grad=True,
               inplace_backward=False, **kw):
    """(loss, student grad, teacher grad) of `fastkd.distillation_loss(backend="torch")`.

    reduction="none" is reduced with the oracle's fixed row weights, so each row's gradient
    is checked with a distinct scale."""
    s = student.detach().clone().requires_grad_(student_grad)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = fastkd.distillation_loss(s, t, target, backend="torch",
                                    inplace_backward=inplace_backward, **kw)
    scalar = loss if loss.dim() == 0 else (loss.double() * row_weights(loss.shape)).sum()
    scalar.backward()
    return loss.detach(), s.grad, t.grad


def assert_close(actual, expected, rtol, atol=0.0, what="value"):
    """max |actual - expected| <= rtol * max |expected| + atol (relative error in the max
    norm over the whole tensor: a gradient is judged against its own scale, so a tiny entry
    that cancels is not asked for more digits than the dtype has)."""
    assert actual is not None, f"{what}: missing"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double(), expected.detach().double()
    assert bool(torch.isfinite(a).all()), f"{what}: non-finite values"
    err, scale = (a - e).abs().max(), e.abs().max()
    assert err <= rtol * scale + atol, f"{what}: error {err:.3e} > {rtol:g} * {scale:.3e} + {atol}"


def check_against_oracle(student, teacher, target=None, *, student_grad=True,
                         teacher_grad=True, inplace_backward=False, rtol=None, atol=None,
                         **kw):
    """Runs fastkd and the oracle on the same inputs and compares loss and gradients.

    The default absolute floor is the dtype's smallest normal number: a gradient entry of
    1e-47 (a saturated softmax) has no float32 representation."""
    rtol = RTOL[student.dtype] if rtol is None else rtol
    atol = torch.finfo(student.dtype).tiny if atol is None else atol
    loss, gs, gt = run_fastkd(student, teacher, target, student_grad=student_grad,
                              teacher_grad=teacher_grad, inplace_backward=inplace_backward,
                              **kw)
    ref_loss, ref_gs, ref_gt = oracle_with_grads(student, teacher, target, teacher_grad, **kw)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert_close(loss, ref_loss, rtol, atol, "loss")
    if student_grad:
        assert gs.dtype == student.dtype
        assert_close(gs, ref_gs, rtol, atol, "student grad")
    else:
        assert gs is None
    if teacher_grad:
        assert gt.dtype == teacher.dtype
        assert_close(gt, ref_gt, rtol, atol, "teacher grad")
    else:
        assert gt is None
    return loss, gs, gt


def inputs(shape, dtype=torch.float64, ignore_fraction=0.3, scale=3.0, seed=0):
    student = random_logits(*shape, scale=scale, dtype=dtype, seed=seed)
    teacher = random_logits(*shape, scale=scale, dtype=dtype, seed=seed + 1)
    target = random_target(*shape[:-1], vocab=shape[-1], ignore_fraction=ignore_fraction,
                           seed=seed)
    return student, teacher, target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_divergence_temperature_reduction(divergence, beta, temperature, reduction, dtype):
    student, teacher, target = inputs((2, 3, 37), dtype, seed=11)
    check_against_oracle(student, teacher, target, temperature=temperature, alpha=0.3,
                         divergence=divergence, beta=beta, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_ignored_fraction(fraction, divergence, beta, reduction):
    student, teacher, target = inputs((6, 29), torch.float32, ignore_fraction=fraction, seed=3)
    kw = dict(temperature=2.0, divergence=divergence, beta=beta, reduction=reduction)
    loss, gs, gt = check_against_oracle(student, teacher, target, **kw)
    ignored = target == -100
    assert bool((gs[ignored] == 0).all()) and bool((gt[ignored] == 0).all())
    if fraction == 1.0:
        assert bool((loss == 0).all()), "all-ignored loss must be exactly 0"
        assert bool((gs == 0).all()) and bool((gt == 0).all()), "all-ignored grads must be 0"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("student_padded", [False, True], ids=["student-finite", "padded"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_neg_inf_teacher_columns(divergence, beta, student_padded, dtype):
    kernel_checks.skip_infinite_reverse_kl(divergence, student_padded)
    student, teacher, _ = inputs((8, 41), dtype, seed=5)
    mask = masked_columns(8, 41, seed=5)
    student, teacher = mask_logits(student, teacher, mask, student_padded)
    target = torch.zeros(8, dtype=torch.int64)  # column 0 is never masked
    target[2] = -100
    loss, gs, gt = check_against_oracle(student, teacher, target, temperature=2.0,
                                        divergence=divergence, beta=beta, reduction="none")
    assert_masked_gradients_zero(gs, gt, mask, student_padded)


def test_zero_weight_term_is_not_evaluated():
    """alpha=1: the divergence (here infinite: reverse KL against a masked teacher) has weight
    0 and must not be evaluated, so no 0 * inf = NaN reaches the loss or the gradients."""
    student, teacher, target = inputs((6, 23), torch.float32, seed=9)
    teacher[:, 5] = float("-inf")
    loss, gs, gt = run_fastkd(student, teacher, target, alpha=1.0, divergence="reverse_kl",
                              temperature=2.0)
    finite_teacher = teacher.masked_fill(torch.isinf(teacher), 0.0)
    ref_loss, ref_gs, _ = oracle_with_grads(student, finite_teacher, target, alpha=1.0,
                                            temperature=2.0)
    assert_close(loss, ref_loss, 1e-5, what="loss")
    assert_close(gs, ref_gs, 1e-5, what="student grad")
    assert bool((gt == 0).all()), "alpha=1 gives the teacher no gradient"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("temperature", [1.0, 8.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_extreme_logits(divergence, beta, temperature, dtype):
    student, teacher, target = inputs((5, 33), dtype, scale=1e4, seed=21)
    assert student.abs().max() > 1e4
    # Saturated softmaxes make some gradients cancel to ~1e-66 (the JSD teacher gradient at
    # T=8): judge the error against the gradient's natural unit, div_weight / T = (1-alpha)*T.
    atol = RTOL[dtype] * 0.5 * temperature
    check_against_oracle(student, teacher, target, temperature=temperature,
                         divergence=divergence, beta=beta, label_smoothing=0.1, atol=atol)


@pytest.mark.parametrize("shape", [(13,), (5, 13), (2, 3, 13), (2, 1, 3, 13)],
                         ids=lambda s: "x".join(map(str, s)))
def test_leading_dims(shape):
    student, teacher, target = inputs(shape, torch.float64, seed=2)
    loss, _, _ = check_against_oracle(student, teacher, target, temperature=2.0,
                                      reduction="none")
    assert loss.shape == shape[:-1]
    flat = fastkd.distillation_loss(student.reshape(-1, 13), teacher.reshape(-1, 13),
                                    target.reshape(-1), temperature=2.0, reduction="none",
                                    backend="torch")
    assert torch.equal(flat, loss.reshape(-1))


OPTION_CASES = {
    "label_smoothing": dict(label_smoothing=0.1),
    "label_smoothing_1": dict(label_smoothing=1.0),
    "softcap": dict(softcap=5.0),
    "softcap_smoothing_T2": dict(softcap=4.0, label_smoothing=0.2, temperature=2.0),
    "num_items_int": dict(num_items_in_batch=17),
    "num_items_tensor": dict(num_items_in_batch=torch.tensor(17)),
    "num_items_float_tensor": dict(num_items_in_batch=torch.tensor(9.5)),
    "no_t2": dict(scale_by_t2=False, temperature=4.0),
    "alpha_0": dict(alpha=0.0, temperature=2.0),
    "alpha_1": dict(alpha=1.0, temperature=2.0),
    "no_target": dict(target=None, alpha=0.7, temperature=2.0),
    "no_target_none": dict(target=None, temperature=0.5, reduction="none"),
    "ignore_index_0": dict(ignore_index=0),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options(case, divergence, beta, dtype):
    kw = dict(OPTION_CASES[case])
    student, teacher, target = inputs((3, 4, 19), dtype, seed=31)
    target = kw.pop("target", target)
    if kw.get("ignore_index") == 0:
        target = target.clamp(min=0)  # label 0 now means "ignored"
    check_against_oracle(student, teacher, target, divergence=divergence, beta=beta, **kw)


@pytest.mark.parametrize("student_grad,teacher_grad", [(True, False), (False, True)])
def test_which_inputs_get_gradients(student_grad, teacher_grad):
    student, teacher, target = inputs((4, 17), torch.float32, seed=4)
    check_against_oracle(student, teacher, target, student_grad=student_grad,
                         teacher_grad=teacher_grad, temperature=2.0, divergence="jsd")


def test_forward_without_grad_matches():
    student, teacher, target = inputs((4, 17), torch.float32, seed=4)
    with torch.no_grad():
        loss = fastkd.distillation_loss(student.requires_grad_(), teacher, target,
                                        temperature=2.0, backend="torch")
    assert loss.grad_fn is None
    assert_close(loss, oracle_loss(student, teacher, target, temperature=2.0), 1e-5)


def test_alpha_0_uses_target_only_as_mask():
    """alpha=0 with a target == the pure divergence over the non-ignored rows only."""
    student, teacher, target = inputs((12, 19), torch.float64, seed=8)
    masked = fastkd.distillation_loss(student, teacher, target, alpha=0.0, temperature=2.0,
                                      backend="torch")
    keep = target != -100
    plain = fastkd.distillation_loss(student[keep], teacher[keep], None, temperature=2.0,
                                     backend="torch")
    assert_close(masked, plain, 1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(4, 5, 1), (4, 5, 7), (6, 1000), (3, 32000)],
                         ids=["V1", "V7", "V1000", "V32000"])
def test_vocab_sizes(shape, dtype):
    student, teacher, target = inputs(shape, dtype, seed=13)
    # V=1: every distribution is the point mass, so loss and gradients are 0; the smoothed CE
    # lse - 0.9 z - 0.1 mean(z) cancels only to rounding of |z| ~ 3: an absolute floor.
    atol = RTOL[dtype] if shape[-1] == 1 else None
    for divergence in ("kl", "jsd"):
        check_against_oracle(student, teacher, target, temperature=2.0, divergence=divergence,
                             label_smoothing=0.1, atol=atol)


def low_precision_error_bound(kernel, oracle, eager, half_ulp):
    """docs/semantics.md §10: error <= 2 * eager error + one rounding of the largest value."""
    kernel_err = (kernel.double() - oracle).abs().max()
    eager_err = (eager.double() - oracle).abs().max()
    return kernel_err, 2 * eager_err + half_ulp * oracle.abs().max()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision(dtype, divergence, beta, temperature):
    student, teacher, target = inputs((4, 8, 257), dtype, seed=17)
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, label_smoothing=0.1)
    loss, gs, gt = run_fastkd(student, teacher, target, **kw)
    assert loss.dtype == torch.float32 and gs.dtype == dtype and gt.dtype == dtype
    exact = oracle_with_grads(student, teacher, target, **kw)
    eager = oracle_with_grads(student, teacher, target, dtype=dtype, **kw)
    for what, kernel, ref, same_dtype in zip(("loss", "student grad", "teacher grad"),
                                             (loss, gs, gt), exact, eager):
        # The loss comes back in float32: its floor is float32 rounding, not the dtype's.
        half_ulp = 2.0**-24 if what == "loss" else HALF_ULP[dtype]
        err, bound = low_precision_error_bound(kernel, ref, same_dtype, half_ulp)
        assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e}"


class CallCounter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("chunk_elements,rows_per_chunk", [(100, 2), (16, 1)],
                         ids=["2-rows", "V-larger-than-chunk"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
def test_reference_chunking(monkeypatch, chunk_elements, rows_per_chunk, inplace):
    shape = (5, 7, 37)
    student, teacher, target = inputs(shape, torch.float64, seed=23)
    kw = dict(temperature=2.0, divergence="jsd", label_smoothing=0.1, softcap=6.0)
    whole = run_fastkd(student, teacher, target, **kw)
    counter = CallCounter(reference_dense._divergence_and_grads)
    monkeypatch.setattr(reference_dense, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(reference_dense, "_divergence_and_grads", counter)
    chunked = check_against_oracle(student, teacher, target, inplace_backward=inplace, **kw)
    assert counter.calls == -(-35 // rows_per_chunk), "the rows must run in several chunks"
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


@pytest.mark.parametrize("divergence", ["kl", "tvd"])
def test_inplace_backward_same_gradients(divergence):
    """Logits straight from an lm-head (a non-leaf): in-place backward overwrites them with
    their gradient and must give the same parameter gradients."""
    hidden = random_logits(6, 16, dtype=torch.float32, seed=1)
    weight = random_logits(53, 16, scale=0.3, dtype=torch.float32, seed=2)
    teacher = random_logits(6, 53, dtype=torch.float32, seed=3)
    target = random_target(6, vocab=53, ignore_fraction=0.3, seed=1)
    grads = []
    for inplace in (False, True):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        t = teacher.clone().requires_grad_()
        loss = fastkd.distillation_loss(h @ w.T, t, target, temperature=2.0,
                                        divergence=divergence, backend="torch",
                                        inplace_backward=inplace)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad, t.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_inplace_backward_leaf_student():
    student, teacher, target = inputs((5, 31), torch.float32, seed=6)
    expected = run_fastkd(student, teacher, target, temperature=2.0)
    got = run_fastkd(student, teacher, target, temperature=2.0, inplace_backward=True)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_backward_twice_raises():
    student, teacher, target = inputs((4, 11), torch.float32, seed=7)
    s = student.requires_grad_()
    loss = fastkd.distillation_loss(s, teacher, target, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


@pytest.mark.parametrize("alias", [False, True], ids=["buffers", "grad-aliases-student"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_kernel_contract_poisoned_buffers(divergence, beta, alias):
    """The kernel itself: NaN-poisoned gradient buffers are fully written (ignored rows with
    exact zeros), rows are the weighted per-row loss, in float32."""
    student, teacher, target = inputs((9, 21), torch.float32, seed=29)
    temperature, alpha = 2.0, 0.4
    code = fastkd.reference.DIVERGENCES.index(divergence)
    s = student.clone()
    grad_s = s if alias else torch.full_like(s, float("nan"))
    grad_t = torch.full_like(teacher, float("nan"))
    args = KernelArgs(temperature, alpha, (1 - alpha) * temperature**2, code,
                      beta if divergence == "jsd" else 0.0, 0.0, -100, 0.1, 0.0)
    rows = fastkd.reference.dense_kd_rows(s, teacher, target, grad_s, grad_t, None, args)
    kw = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
              label_smoothing=0.1)
    assert rows.dtype == torch.float32
    assert_close(rows, oracle_loss(student, teacher, target, reduction="none", **kw), 1e-5)
    s64 = student.double().requires_grad_()
    t64 = teacher.double().requires_grad_()
    oracle_loss(s64, t64, target, reduction="sum", **kw).backward()
    assert_close(grad_s, s64.grad, 1e-5, what="student grad")
    assert_close(grad_t, t64.grad, 1e-5, what="teacher grad")
    ignored = target == -100
    assert bool((grad_s[ignored] == 0).all()) and bool((rows[ignored] == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_target", [False, True], ids=["no-target", "target"])
def test_empty_batch(reduction, with_target):
    """Zero tokens: loss 0 (or an empty tensor), empty gradient, no NaN."""
    student, teacher = torch.randn(0, 9), torch.randn(0, 9)
    target = torch.zeros(0, dtype=torch.int64) if with_target else None
    loss, gs, gt = run_fastkd(student, teacher, target, reduction=reduction)
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert loss.item() == 0.0
    assert gs.shape == (0, 9) and gt.shape == (0, 9)


MIXED_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
               (torch.float32, torch.float16), (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("dtypes", MIXED_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}"[12:])
def test_kernel_contract_strided_mixed_dtypes_terms(dtypes, divergence, beta, with_target):
    """dense_kd_rows on strided rows (student, teacher and both gradient buffers each with
    its own row stride), each side in its own dtype, with the terms buffer."""
    student = random_logits(7, 45, dtype=dtypes[0], seed=41)
    teacher = random_logits(7, 45, dtype=dtypes[1], seed=42)
    target = random_target(7, vocab=45, ignore_fraction=0.3, seed=43) if with_target else None
    kernel_checks.check_layout_dtypes_terms(
        fastkd.reference.dense_kd_rows, student, teacher, target, temperature=2.0, alpha=0.3,
        divergence=divergence, beta=beta, label_smoothing=0.1)


def test_kernel_terms_with_zero_weights():
    """Both terms are computed even at weight 0, and a zero-weight infinite term (reverse KL
    against a -inf teacher column, alpha=1) stays out of the rows and gradients."""
    student, teacher, target = inputs((6, 23), torch.float32, seed=44)
    teacher[:, 5] = float("-inf")
    terms = torch.full((6, 2), float("nan"))
    grad = torch.full_like(student, float("nan"))
    rows = fastkd.reference.dense_kd_rows(student, teacher, target, grad, None, terms,
                                          KernelArgs(2.0, 1.0, 0.0, 1, 0.0, 0.0, -100, 0.0,
                                                     0.0))
    valid = target != -100
    assert bool(torch.isfinite(rows).all()) and bool(torch.isfinite(grad).all())
    assert torch.equal(rows, terms[:, 0])
    assert bool(torch.isinf(terms[valid, 1]).all()) and bool((terms[~valid] == 0).all())
    finite = teacher.masked_fill(torch.isinf(teacher), 0.0)
    terms_ce0 = torch.full((6, 2), float("nan"))
    rows = fastkd.reference.dense_kd_rows(student, finite, target, None, None, terms_ce0,
                                          KernelArgs(2.0, 0.0, 4.0, 0, 0.0, 0.0, -100, 0.0,
                                                     0.0))
    ce = oracle_loss(student, finite, target, alpha=1.0, reduction="none")
    assert_close(terms_ce0[:, 0], ce, 1e-5, what="ce at weight 0")
    assert_close(rows, 4.0 * terms_ce0[:, 1], 1e-6, what="rows")


def test_reference_float64_with_one_float64_side():
    """Either side float64: arithmetic and rows in float64, each gradient in its dtype."""
    student = random_logits(5, 19, dtype=torch.float32, seed=45)
    teacher = random_logits(5, 19, dtype=torch.float64, seed=46)
    gs, gt = torch.empty_like(student), torch.empty_like(teacher)
    rows = fastkd.reference.dense_kd_rows(student, teacher, None, gs, gt, None,
                                          KernelArgs(2.0, 0.0, 4.0, 2, 0.3, 0.0, -100, 0.0,
                                                     0.0))
    assert rows.dtype == torch.float64
    ref = oracle_loss(student, teacher, None, temperature=2.0, divergence="jsd", beta=0.3,
                      reduction="none")
    assert_close(rows, ref, 1e-12, what="rows")
    assert gs.dtype == torch.float32 and gt.dtype == torch.float64


@pytest.mark.parametrize("backend_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_api_slices_and_mixed_dtypes_through_reference(backend_dtype):
    """distillation_loss(backend="torch") on a causal slice in one dtype against a teacher
    slice in another: same numbers as contiguous float64 copies of the same values."""
    full = random_logits(3, 6, 33, dtype=backend_dtype, seed=47)
    teacher_full = random_logits(3, 6, 33, dtype=torch.float32, seed=48)
    target = random_target(3, 5, vocab=33, ignore_fraction=0.2, seed=49)
    kw = dict(temperature=2.0, alpha=0.3, divergence="reverse_kl", reduction="none")
    loss, gs, gt = run_fastkd(full[:, :-1], teacher_full[:, 1:], target, **kw)
    ref_loss, ref_gs, ref_gt = oracle_with_grads(full[:, :-1], teacher_full[:, 1:], target,
                                                 **kw)
    assert gs.dtype == backend_dtype and gt.dtype == torch.float32
    assert_close(loss, ref_loss, 1e-5, what="loss")
    rounding = 0.0 if backend_dtype == torch.float32 else 6 * HALF_ULP[backend_dtype]
    assert_close(gs, ref_gs, 1e-5 + rounding, what="student grad")
    assert_close(gt, ref_gt, 1e-5, what="teacher grad")
