"""The CUDA backend (csrc/cuda/, `torch.ops.fastkd.dense_kd` on CUDA tensors) against the
independent float64 oracle.

Every test needs a CUDA device and fastkd._C built with its CUDA kernels; elsewhere they are
skipped with that reason (the kernels' maths is checked on CPU by
tests/test_cuda_math_emulation.py and their compilation by `make cuda-check`). Both kernels are
reached: FASTKD_CUDA_DENSE_PATH forces the generic (one CTA per row, several sweeps) or the
cluster kernel (Hopper: the row in distributed shared memory), FASTKD_CUDA_CLUSTER_SIZE a
cluster size; "auto" is the planner's choice. Raw op calls are checked row by row (loss rows and
d sum(rows) / d logits); `fastkd.distillation_loss(..., backend="cuda")` end to end. Outputs are
poisoned with NaN first. Tolerances: docs/semantics.md §10 (fp32 1e-5 in the max norm; bf16 /
fp16 at most twice the error of the same-dtype eager formula plus one rounding).
"""

from __future__ import annotations

import kernel_checks
import native_checks
import pytest
import torch
from kernel_checks import DIVERGENCE_CASES, DIVERGENCE_IDS, HALF_ULP, assert_close
from oracle import oracle_with_grads, row_weights

import fastkd


def _cuda_kernels_built() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from fastkd.ops import native
    except Exception:  # extension missing or broken: the backend is unavailable
        return False
    return bool(native.HAS_CUDA)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda_kernels_built(),
                       reason="needs a CUDA device and fastkd._C built with CUDA"),
]

DIVERGENCES = kernel_checks.DIVERGENCE_CODES[:4]  # the parameter-free first four
PATHS = {
    "auto": {},
    "generic": {"FASTKD_CUDA_DENSE_PATH": "generic"},
    "cluster": {"FASTKD_CUDA_DENSE_PATH": "cluster"},
    "cluster16": {"FASTKD_CUDA_DENSE_PATH": "cluster", "FASTKD_CUDA_CLUSTER_SIZE": "16"},
}


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    """Runs a test once per kernel path (cluster ones only on Hopper)."""
    if request.param.startswith("cluster") and not hopper():
        pytest.skip("the cluster kernel needs compute capability 9.0 (Hopper)")
    for name, value in PATHS[request.param].items():
        monkeypatch.setenv(name, value)
    return request.param


def inputs(n, vocab, dtype=torch.float32, ignore_fraction=0.3, scale=3.0, seed=0):
    return kernel_checks.inputs(n, vocab, dtype, ignore_fraction, scale, seed, device="cuda")


def kernel_with_terms(s, t, y, gs, gt, terms, args):
    """The kernel contract on the raw CUDA op, synchronised."""
    rows = torch.ops.fastkd.dense_kd(s, t, y, gs, gt, *args.dense_scalars(), terms)
    torch.cuda.synchronize()
    return rows


dense_kd_synchronized = kernel_with_terms


def run_op(student, teacher, target, **kw):
    """Raw op call: (rows, grad_student or None, grad_teacher or None)."""
    return kernel_checks.run_raw(dense_kd_synchronized, student, teacher, target, **kw)


def check_op(student, teacher, target, rtol=1e-5, atol=None, **kw):
    """Raw op vs oracle; float32 to rtol, bf16 / fp16 against the same-dtype eager formula."""
    return kernel_checks.check_raw_kernel(run_op, student, teacher, target, rtol, atol,
                                          half_ulps=HALF_ULP, **kw)


# ------------------------------------------------------------------ small shapes, every path
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4097])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_divergences_and_vocab_sizes(path, divergence, beta, vocab):
    student, teacher, target = inputs(5, vocab, seed=vocab)
    target[1] = -100
    check_op(student, teacher, target, atol=1e-5 if vocab == 1 else None,
             divergence=divergence, beta=beta, label_smoothing=0.1)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperatures(path, divergence, temperature):
    student, teacher, target = inputs(4, 600, seed=2)
    check_op(student, teacher, target, divergence=divergence, temperature=temperature,
             alpha=0.4, label_smoothing=0.2)


def test_jsd_near_one_hot(path):
    kernel_checks.check_jsd_near_one_hot(run_op, inputs)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_low_temperature(path, divergence, beta):
    """T = 0.5: jsd / tvd gradients cancel in float32; bound by twice the eager float32 error."""
    student, teacher, target = inputs(4, 600, seed=3)
    kernel_checks.check_low_temperature(run_op, student, teacher, target,
                                        divergence=divergence, beta=beta, label_smoothing=0.1)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_softcap(path, divergence, beta):
    student, teacher, target = inputs(4, 700, scale=8.0, seed=4)
    check_op(student, teacher, target, divergence=divergence, beta=beta, softcap=5.0,
             label_smoothing=0.1)


@pytest.mark.parametrize("student_padded", [False, True], ids=["student-finite", "padded"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_neg_inf_columns(path, divergence, beta, student_padded):
    kernel_checks.skip_infinite_reverse_kl(divergence, student_padded)
    student, teacher, _ = inputs(4, 1000, seed=5)
    mask = kernel_checks.masked_columns(4, 1000, seed=5).cuda()  # row 1: whole CTA slices of -inf
    student, teacher = kernel_checks.mask_logits(student, teacher, mask, student_padded)
    target = torch.zeros(4, dtype=torch.int64, device="cuda")
    target[2] = -100
    _, gs, gt = check_op(student, teacher, target, divergence=divergence, beta=beta)
    kernel_checks.assert_masked_gradients_zero(gs, gt, mask, student_padded)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_extreme_logits(path, divergence, beta):
    student, teacher, target = inputs(4, 900, scale=1e4, seed=21)
    check_op(student, teacher, target, atol=1e-5 * 0.7 * 2.0, divergence=divergence, beta=beta,
             label_smoothing=0.1)


def test_ignored_rows_and_all_ignored(path):
    student, teacher, target = inputs(6, 1000, ignore_fraction=0.5, seed=6)
    target[0], target[1] = -100, 3
    rows, gs, gt = check_op(student, teacher, target, divergence="jsd")
    kernel_checks.assert_ignored_rows_zero(rows, gs, gt, target == -100)
    rows, gs, gt = run_op(student, teacher, torch.full_like(target, -100))
    assert bool((rows == 0).all()) and bool((gs == 0).all()) and bool((gt == 0).all())


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_no_target(path, divergence):
    student, teacher, _ = inputs(5, 1000, seed=7)
    check_op(student, teacher, None, divergence=divergence, temperature=1.5)


def test_zero_weight_term_is_not_evaluated(path):
    """alpha=1: the (infinite) divergence has weight 0, its teacher gradient is 0; alpha=0:
    CE has weight 0 and the target only masks rows."""
    student, teacher, target = inputs(4, 1000, seed=9)
    kernel_checks.check_zero_weight_terms(run_op, check_op, student, teacher, target)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_forward_only_and_teacher_only(path, divergence):
    student, teacher, target = inputs(4, 1000, seed=10)
    check_op(student, teacher, target, divergence=divergence, grad_student=False,
             grad_teacher=False)
    check_op(student, teacher, target, divergence=divergence, grad_student=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("divergence", ["kl", "tvd"])
def test_inplace_student_gradient(path, divergence, dtype):
    """grad_student aliases student: every element is written after its last read."""
    student, teacher, target = inputs(4, 4096, dtype, seed=12)
    check_op(student, teacher, target, inplace=True, grad_teacher=False,
             divergence=divergence, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_low_precision(path, dtype, divergence, beta):
    student, teacher, target = inputs(4, 1000, dtype, seed=17)
    check_op(student, teacher, target, divergence=divergence, beta=beta, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_unaligned_rows_and_row_stride(path, dtype):
    """V = 50257 (rows not 16-byte aligned: scalar accesses) and a strided view of a wider
    buffer (row stride > V)."""
    student, teacher, target = inputs(3, 50257, dtype, seed=18)
    check_op(student, teacher, target, divergence="jsd", label_smoothing=0.1)
    wide_s, wide_t, _ = inputs(3, 4104, dtype, seed=19)
    check_op(wide_s[:, :4096], wide_t[:, 3:4099], target.clamp(max=4095), divergence="kl")


def test_deterministic(path):
    """Two launches on the same inputs agree bit for bit (a moving result would be a race)."""
    student, teacher, target = inputs(8, 32000, torch.bfloat16, seed=20)
    first = run_op(student, teacher, target, divergence="tvd", label_smoothing=0.1)
    second = run_op(student, teacher, target, divergence="tvd", label_smoothing=0.1)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ inputs as users hold them
@pytest.mark.parametrize("student_dtype,teacher_dtype", native_checks.DTYPE_PAIRS,
                         ids=native_checks.DTYPE_PAIR_IDS)
def test_mixed_dtypes(path, student_dtype, teacher_dtype):
    """Each side in its own dtype (vectors only for equal element sizes), with and without
    the teacher gradient; each gradient within float32 error plus one rounding."""
    for vocab in (1000, 32000):
        student, teacher, target = native_checks.mixed_inputs(
            4, vocab, student_dtype, teacher_dtype, seed=vocab, device="cuda")
        for divergence, beta in DIVERGENCE_CASES:
            for teacher_grad in (True, False):
                native_checks.check_against_oracle(
                    kernel_with_terms, student, teacher, target, grad_teacher=teacher_grad,
                    divergence=divergence, beta=beta, label_smoothing=0.1,
                    softcap=6.0 if divergence == "jsd" else None)


@pytest.mark.parametrize("student_dtype,teacher_dtype",
                         [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                          (torch.float16, torch.bfloat16)], ids=["fp32", "bf16-fp32", "fp16-bf16"])
def test_strided_rows_and_causal_shift(path, student_dtype, teacher_dtype):
    for divergence in ("kl", "jsd"):
        native_checks.check_strided_slices(kernel_with_terms, student_dtype, teacher_dtype,
                                           device="cuda", divergence=divergence)
        native_checks.check_causal_shift_in_place(kernel_with_terms, student_dtype,
                                                  device="cuda", divergence=divergence)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_terms(path, divergence, beta):
    for dtypes in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        student, teacher, target = native_checks.mixed_inputs(6, 32000, *dtypes, seed=41,
                                                              device="cuda")
        kw = dict(divergence=divergence, beta=beta, temperature=2.0, label_smoothing=0.1)
        for alpha in (0.0, 0.3, 1.0):
            native_checks.check_terms(kernel_with_terms, student, teacher, target, alpha=alpha,
                                      **kw)
        native_checks.check_terms(kernel_with_terms, student, teacher, None, **kw)


def test_opcheck_terms_mixed_dtypes():
    student, teacher, target = native_checks.mixed_inputs(3, 37, torch.bfloat16,
                                                          torch.float32, device="cuda")
    terms = torch.empty(3, 2, device="cuda")
    args = kernel_checks.op_args(student, teacher, target, torch.empty_like(student),
                                 torch.empty_like(teacher), divergence="jsd")
    torch.library.opcheck(torch.ops.fastkd.dense_kd.default, args + (terms,))


# ------------------------------------------------------------------ real vocabulary sizes
REAL_VOCABS = [32000, 128256, 151936, 262144]


@pytest.mark.parametrize("vocab", REAL_VOCABS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "f32"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_real_vocab(divergence, beta, dtype, vocab):
    """Planner's choice (cluster sizes 2..16 on Hopper), teacher gradient, a half -inf row."""
    student, teacher, target = inputs(6, vocab, dtype, ignore_fraction=0.25, seed=vocab)
    teacher[0, vocab // 2:] = float("-inf")
    target[0] = 3
    check_op(student, teacher, target, divergence=divergence, beta=beta, label_smoothing=0.1)


@pytest.mark.parametrize("cluster_size", [1, 2, 4, 8, 16])
def test_every_cluster_size(monkeypatch, cluster_size):
    if not hopper():
        pytest.skip("the cluster kernel needs compute capability 9.0 (Hopper)")
    monkeypatch.setenv("FASTKD_CUDA_DENSE_PATH", "cluster")
    monkeypatch.setenv("FASTKD_CUDA_CLUSTER_SIZE", str(cluster_size))
    student, teacher, target = inputs(5, 32000, torch.bfloat16, seed=22)
    check_op(student, teacher, target, divergence="jsd", label_smoothing=0.1)


def test_forced_cluster_that_cannot_fit_raises(monkeypatch):
    if not hopper():
        pytest.skip("the cluster kernel needs compute capability 9.0 (Hopper)")
    monkeypatch.setenv("FASTKD_CUDA_DENSE_PATH", "cluster")
    monkeypatch.setenv("FASTKD_CUDA_CLUSTER_SIZE", "1")
    student, teacher, target = inputs(2, 262144, seed=23)
    with pytest.raises(RuntimeError, match="does not fit"):
        run_op(student, teacher, target)


def test_row_too_large_for_a_cluster_uses_generic():
    """fp32 rows beyond 460800 columns do not fit 16 x 227 KB: the generic kernel runs."""
    student, teacher, target = inputs(2, 500000, seed=24)
    check_op(student, teacher, target, divergence="kl", label_smoothing=0.1)


def test_more_rows_than_the_grid(monkeypatch):
    """The generic grid is capped at 2^20 CTAs: rows beyond it are reached by grid stride."""
    monkeypatch.setenv("FASTKD_CUDA_DENSE_PATH", "generic")
    student, teacher, target = inputs((1 << 20) + 3, 8, ignore_fraction=0.1, seed=25)
    check_op(student, teacher, target, divergence="kl")


# ------------------------------------------------------------------ public API, op machinery
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_public_api(divergence, beta, reduction):
    student, teacher, target = inputs(6, 32000, seed=31)
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=beta,
              reduction=reduction, label_smoothing=0.1)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss = fastkd.distillation_loss(s, t, target, backend="cuda", **kw)
    ref = oracle_with_grads(student.cpu(), teacher.cpu(), target.cpu(), **kw)
    if reduction == "none":
        (loss * row_weights(loss.shape).to(loss.device, torch.float32)).sum().backward()
    else:
        loss.backward()
    for what, a, e in zip(("loss", "student grad", "teacher grad"),
                          (loss.detach(), s.grad, t.grad), ref):
        assert_close(a, e, what=what)


def test_public_api_inplace_backward_bf16():
    student, teacher, target = inputs(4, 128256, torch.bfloat16, seed=32)
    kw = dict(temperature=2.0, alpha=0.5)
    s = student.clone().requires_grad_(True)
    loss = fastkd.distillation_loss(s, teacher, target, backend="cuda", inplace_backward=True,
                                    **kw)
    loss.backward()
    exact = oracle_with_grads(student.cpu(), teacher.cpu(), target.cpu(), False, **kw)
    eager = oracle_with_grads(student.cpu(), teacher.cpu(), target.cpu(), False,
                              dtype=torch.bfloat16, **kw)
    kernel_checks.low_precision_check(loss.detach(), exact[0], eager[0],
                                      HALF_ULP[torch.float32], "loss")
    kernel_checks.low_precision_check(s.grad, exact[1], eager[1], HALF_ULP[torch.bfloat16],
                                      "student grad")


def test_opcheck():
    student, teacher, target = inputs(3, 37, seed=40)
    nan = float("nan")
    args = (student, teacher, target, torch.full_like(student, nan),
            torch.full_like(teacher, nan), 2.0, 0.3, 2.8, 0, 0.5, -100, 0.1, 0.0)
    torch.library.opcheck(torch.ops.fastkd.dense_kd.default, args)
    no_grads = (student, teacher, None, None, None, 1.0, 0.0, 1.0, 2, 0.5, -100, 0.0, 3.0)
    torch.library.opcheck(torch.ops.fastkd.dense_kd.default, no_grads)


def test_torch_compile_fullgraph():
    student, teacher, target = inputs(4, 4096, seed=42)
    kernel_checks.assert_compiled_matches_eager(fastkd.distillation_loss, student, teacher,
                                                target, backend="cuda",
                                                **kernel_checks.COMPILE_OPTIONS)


def test_bad_inputs_name_the_argument():
    student, teacher, target = inputs(3, 10)
    op = torch.ops.fastkd.dense_kd
    kernel_checks.assert_bad_inputs_name_the_argument(op, student, teacher, target)
    with pytest.raises(ValueError, match="teacher"):
        op(student, teacher.cpu(), target, None, None, *kernel_checks.VALID_SCALARS)
