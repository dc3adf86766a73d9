"""Checks of the native (C++ CPU and CUDA) dense kernels' input handling, shared by
tests/test_cpu_dense_inputs.py and tests/test_cuda_dense.py.

Mixed student / teacher dtypes, rows read where they are (slices with their own row strides,
the causal shift `logits[:, :-1]` of each batch element, a transposed batch) and the `terms`
output (unweighted CE and divergence per row). Every check runs a kernel with the contract's
arguments (`kernel_checks.kernel_args`) on NaN-poisoned outputs and compares with
the float64 oracle of tests/oracle.py; nothing here imports fastkd.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from kernel_checks import OUTPUTS, kernel_args, max_error, oracle_rows, poisoned
from oracle import oracle_loss, random_logits, random_target

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: Every (student dtype, teacher dtype) pair.
DTYPE_PAIRS = [(s, t) for s in DTYPES for t in DTYPES]
DTYPE_PAIR_IDS = [f"{DTYPE_IDS[s]}-{DTYPE_IDS[t]}" for s, t in DTYPE_PAIRS]


def mixed_inputs(n, vocab, student_dtype, teacher_dtype, seed=0, device="cpu", scale=3.0,
                 ignore_fraction=0.3):
    """(student, teacher, target): normal logits of each side's dtype, some rows ignored."""
    student = random_logits(n, vocab, scale=scale, dtype=student_dtype, seed=seed).to(device)
    teacher = random_logits(n, vocab, scale=scale, dtype=teacher_dtype, seed=seed + 1)
    target = random_target(n, vocab=vocab, ignore_fraction=ignore_fraction, seed=seed)
    return student, teacher.to(device), target.to(device)


def run(kernel, student, teacher, target, *, grad_student=True, grad_teacher=True,
        inplace=False, terms=False, **options):
    """(rows, grad_student, grad_teacher, terms) of `kernel` (each None when not asked for);
    every output buffer is poisoned with NaN first. `inplace`: grad_student is a copy of the
    student that the kernel overwrites (the in-place backward)."""
    if inplace:
        student = gs = student.clone()
    else:
        gs = poisoned(student) if grad_student else None
    gt = poisoned(teacher) if grad_teacher else None
    k = torch.full((student.shape[0], 2), float("nan"), device=student.device) if terms else None
    rows = kernel(*kernel_args(student, teacher, target, gs, gt, k, **options))
    return rows, gs, gt, k


def assert_rounded(actual, exact, dtype, what, rtol=1e-5):
    """float32 arithmetic, then one rounding to `dtype`: |actual - exact| exceeds the rounding
    of `dtype` at |exact| by at most rtol * max |exact| (float32 outputs: plain rtol)."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    _, scale = max_error(actual, exact, what)
    info = torch.finfo(dtype)
    # Round to nearest: half an ulp relative, or half the subnormal spacing (fp16 gradients
    # ~1e-6 are subnormal).
    rounding = (exact.abs() * info.eps / 2).clamp(min=info.tiny * info.eps / 2)
    if dtype == torch.float32:
        rounding = 0.0
    excess = ((actual.detach().cpu().double() - exact).abs() - rounding).max().item()
    assert excess <= rtol * scale + 1e-30, \
        f"{what}: {excess:.3e} beyond rounding (scale {scale:.3e})"


def check_against_oracle(kernel, student, teacher, target, *, grad_teacher=True, **options):
    """Rows within 1e-5 of the float64 oracle on the same input values; each gradient in its
    input's dtype, within float32 error plus its one final rounding. Returns the outputs."""
    got = run(kernel, student, teacher, target, grad_teacher=grad_teacher, **options)
    exact = oracle_rows(student, teacher, target, **options)
    dtypes = (torch.float32, student.dtype, teacher.dtype)
    for what, k, x, dtype in zip(OUTPUTS, got[:3], exact, dtypes):
        if k is not None:
            assert_rounded(k, x, dtype, what)
    if not grad_teacher:
        assert got[2] is None
    return got


def oracle_terms(student, teacher, target, temperature=2.0, divergence="kl", beta=0.5,
                 ignore_index=-100, label_smoothing=0.0, softcap=None, skew=0.1,
                 alpha_beta=None, **_):
    """(CE, D) per row in float64: the unweighted terms (0 for ignored rows; CE 0 without a
    target)."""
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, softcap=softcap,
              skew=skew, alpha_beta=alpha_beta,
              reduction="none", label_smoothing=label_smoothing, ignore_index=ignore_index)
    s, t = student.detach().cpu().double(), teacher.detach().cpu().double()
    d = oracle_loss(s, t, None, scale_by_t2=False, **kw)
    if target is None:
        return torch.zeros_like(d), d
    target = target.cpu()
    ce = oracle_loss(s, t, target, alpha=1.0, **kw)
    return ce, torch.where(target != ignore_index, d, 0.0)


def check_terms(kernel, student, teacher, target, **options):
    """terms vs the oracle's CE and D, rows == ce_weight * CE + div_weight * D (to float32
    rounding of that sum), and rows / gradients identical to a call without terms."""
    rows, gs, gt, terms = run(kernel, student, teacher, target, terms=True, **options)
    assert terms.dtype == torch.float32 and terms.shape == (student.shape[0], 2)
    ce, d = oracle_terms(student, teacher, target, **options)
    _, scale = max_error(terms[:, 1], d, "divergence term")
    for what, k, x in (("CE term", terms[:, 0], ce), ("divergence term", terms[:, 1], d)):
        err, s = max_error(k, x, what)
        assert err <= 1e-5 * max(s, scale, 1.0), f"{what}: error {err:.3e} (scale {s:.3e})"
    args = kernel_args(student, teacher, target, None, None, **options)[-1]
    ce_weight, div_weight = args.ce_weight, args.div_weight
    mixed = ce_weight * terms[:, 0].double() + div_weight * terms[:, 1].double()
    err, s = max_error(rows, mixed, "rows vs weighted terms")
    assert err <= 2 * 2.0**-24 * s + 1e-30, f"rows != ce_w * CE + div_w * D: {err:.3e}"
    # Without terms a weight-0 term is skipped (CE alone uses the student's softmax at T = 1
    # directly): then the results may differ from the terms run by float32 rounding only.
    plain = run(kernel, student, teacher, target, **options)
    same_path = div_weight != 0 and (ce_weight != 0 or target is None)
    for what, a, b in zip(OUTPUTS, (rows, gs, gt), plain[:3]):
        if same_path:
            assert torch.equal(a, b), f"{what} changed when terms were asked for"
        else:
            err, s = max_error(a, b.double(), what)
            assert err <= 2e-6 * s + 1e-30, f"{what} changed when terms were asked for: {err:.3e}"
    return terms


def strided_case(n, vocab, student_dtype, teacher_dtype, seed=0, device="cpu"):
    """Student, teacher and gradient buffers as slices of larger buffers, each with its own
    row stride and offset: (student, teacher, target, gs, gt, (gs_base, gt_base))."""
    big_s = random_logits(n, vocab + 37, dtype=student_dtype, seed=seed).to(device)
    big_t = random_logits(n, vocab + 13, dtype=teacher_dtype, seed=seed + 1).to(device)
    student, teacher = big_s[:, :vocab], big_t[:, 5:5 + vocab]
    target = random_target(n, vocab=vocab, ignore_fraction=0.3, seed=seed).to(device)
    gs_base = torch.full((n, vocab + 11), float("nan"), dtype=student_dtype, device=device)
    gt_base = torch.full((n, vocab + 3), float("nan"), dtype=teacher_dtype, device=device)
    return student, teacher, target, gs_base[:, 3:3 + vocab], gt_base[:, 1:1 + vocab], \
        (gs_base, gt_base)


def check_strided_slices(kernel, student_dtype, teacher_dtype, device="cpu", **options):
    """Slices with row strides V + 37 / V + 13 and gradient slices of other buffers: the
    kernel reads and writes them where they are (data pointers unchanged, the columns around
    each gradient slice still NaN) and matches the oracle."""
    n, vocab = 6, 1001
    student, teacher, target, gs, gt, (gs_base, gt_base) = strided_case(
        n, vocab, student_dtype, teacher_dtype, device=device)
    assert not student.is_contiguous() and student.stride(0) == vocab + 37
    pointers = (student.data_ptr(), gs.data_ptr(), gt.data_ptr())
    rows = kernel(*kernel_args(student, teacher, target, gs, gt, **options))
    assert pointers == (student.data_ptr(), gs.data_ptr(), gt.data_ptr())
    exact = oracle_rows(student, teacher, target, **options)
    for what, k, x in zip(OUTPUTS, (rows, gs, gt), exact):
        assert_rounded(k, x, k.dtype, what)
    assert bool(gs_base[:, :3].isnan().all()) and bool(gs_base[:, 3 + vocab:].isnan().all())
    assert bool(gt_base[:, :1].isnan().all()) and bool(gt_base[:, 1 + vocab:].isnan().all())


def check_causal_shift_in_place(kernel, dtype, device="cpu", **options):
    """The in-place backward on `logits[:, :-1]` of a (B, L, V) buffer, one 2-D view per
    batch element (row stride V) and a transposed batch (L, B, V).transpose(0, 1) (row
    stride B * V): gradients land in the original storage, the last position is untouched,
    values match the oracle."""
    batch, length, vocab = 3, 5, 700
    for transposed in (False, True):
        shape = (length, batch, vocab) if transposed else (batch, length, vocab)
        logits = random_logits(*shape, dtype=dtype, seed=7).to(device)
        if transposed:
            logits = logits.transpose(0, 1)
        original = logits.clone()
        teacher = random_logits(batch, length, vocab, dtype=dtype, seed=8).to(device)
        target = random_target(batch, length, vocab=vocab, ignore_fraction=0.2, seed=9)
        target = target.to(device)
        shifted = logits[:, :-1]
        for b in range(batch):
            student = shifted[b]  # (L - 1, V): unit column stride, row stride V or B * V
            assert student.stride(0) == (batch * vocab if transposed else vocab)
            pointer = student.data_ptr()
            x = original[b, :-1]
            exact = oracle_rows(x, teacher[b, :-1], target[b, :-1], **options)
            rows = kernel(*kernel_args(student, teacher[b, :-1], target[b, :-1], student, None,
                                       **options))
            assert student.data_ptr() == pointer
            assert_rounded(rows, exact[0], torch.float32, f"rows of batch element {b}")
            assert_rounded(logits[b, :-1], exact[1], dtype, f"in-place grad of element {b}")
        assert torch.equal(logits[:, -1], original[:, -1]), "the last position was written"


#: The CPU kernel builds checked in subprocesses, named as ATEN_CPU_CAPABILITY takes them and
#: torch.ops.fastkd.cpu_kernel_variant reports them (the test process itself runs the widest
#: build the CPU allows: AVX-512 where present).
CPU_VARIANTS = ("default", "avx2")
_CAPABILITY_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def cpu_variant_skip_reason(variant: str):
    """None when this machine can run the CPU kernel build `variant` ("default", "avx2",
    "avx512"); else why not. ATen's own capability says what the CPU supports (AVX512 only
    with AVX-512 VL/BW/DQ + FMA, AVX2 only with AVX2 + FMA), lowered by any
    ATEN_CPU_CAPABILITY this process runs under."""
    capability = torch.backends.cpu.get_cpu_capability()
    if _CAPABILITY_RANK.get(capability, 0) < _CAPABILITY_RANK[variant.upper()]:
        return (f"ATen's CPU capability here is {capability}: this CPU (or the "
                f"ATEN_CPU_CAPABILITY of this run) does not allow the {variant} kernel build")
    return None


_VARIANT_PRELUDE = """
import sys, torch
sys.path.insert(0, {tests!r})
import fastkd.ops.native, fastkd.ops.sparse_native
for _op in ("dense_kd", "sparse_kd"):
    _got = torch.ops.fastkd.cpu_kernel_variant(_op)
    assert _got == {variant!r}, f"{{_op}} runs the {{_got}} build, expected {variant!r}"
"""


def run_with_cpu_variant(script: str, variant: str) -> subprocess.CompletedProcess:
    """Runs `script` (a template whose ``{tests}`` is this folder) in a fresh Python with
    ATEN_CPU_CAPABILITY=`variant`, which selects that build of the CPU kernels ("default":
    the portable one, "avx2"), after checking there that both the dense and the top-k kernel
    run it (an AssertionError, so a non-zero return code, otherwise)."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = _VARIANT_PRELUDE.format(tests=tests_dir, variant=variant) + \
        script.format(tests=tests_dir)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=variant)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)


def check_cpu_variant(script: str, variant: str) -> None:
    """Runs `script` (which prints "variant-ok" at its end) under that build of the CPU
    kernels (`run_with_cpu_variant`); skips, saying why, where the CPU does not allow it."""
    import pytest

    reason = cpu_variant_skip_reason(variant)
    if reason is not None:
        pytest.skip(reason)
    result = run_with_cpu_variant(script, variant)
    assert result.returncode == 0 and "variant-ok" in result.stdout, result.stderr[-3000:]
