"""The Triton backend (`fastkd.ops.triton_dense`) against the independent float64 oracle.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it): shapes stay tiny
and both kernels are reached, the single-load one (whole row in registers) and the multi-pass
one (forced with a small chunk so rows span several chunks and a partial last one). Raw kernel
calls are checked row by row (loss rows and d sum(rows) / d logits); the public API
`fastkd.distillation_loss(..., backend="triton")` is checked end to end. Gradient buffers are
poisoned with NaN before the kernel writes them. Tolerances follow docs/semantics.md §10. The
@pytest.mark.gpu tests repeat the checks at real vocabulary sizes on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import kernel_checks
import pytest
import torch
from kernel_checks import DIVERGENCE_CASES, DIVERGENCE_IDS, HALF_ULP, assert_close, oracle_rows
from oracle import oracle_with_grads, random_target
from triton_checks import DEVICE, DIVERGENCE_FOUR, FOUR_IDS, ON_CPU, module_marks

import fastkd

triton = pytest.importorskip("triton")
triton_dense = pytest.importorskip("fastkd.ops.triton_dense")

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
compiled_kernels = pytest.mark.skipif(ON_CPU, reason="real sizes need compiled kernels: run "
                                      "with TRITON_INTERPRET=0 on a CUDA machine")
pytestmark = module_marks()

#: Kernel paths: the default launch (single-load for these V), and the multi-pass kernel
#: forced with 512-element chunks so rows span several chunks and end in a partial one.
PATHS = {"single": {}, "multi": dict(max_single_v=0, block_v=512)}


def inputs(n, vocab, dtype=torch.float32, ignore_fraction=0.3, scale=3.0, seed=0):
    return kernel_checks.inputs(n, vocab, dtype, ignore_fraction, scale, seed, device=DEVICE)


def run_kernel(student, teacher, target, *, path="single", **kw):
    """Raw launch: (rows, grad_student or None, grad_teacher or None)."""
    launch = kernel_checks.launcher(triton_dense.launch_dense_kd, **PATHS[path])
    return kernel_checks.run_raw(launch, student, teacher, target, **kw)


def check_kernel(student, teacher, target, rtol=1e-5, atol=None, **kw):
    """Raw kernel vs oracle on rows and both gradients; returns the kernel outputs."""
    return kernel_checks.check_raw_kernel(run_kernel, student, teacher, target, rtol, atol, **kw)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4097])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_divergences_and_vocab_sizes(divergence, beta, vocab, path):
    student, teacher, target = inputs(5 if vocab < 4096 else 3, vocab, seed=vocab)
    target[1] = -100
    # V=1: every term cancels to 0 up to rounding of |z| ~ 3 (an absolute floor).
    atol = 1e-5 if vocab == 1 else None
    check_kernel(student, teacher, target, atol=atol, path=path, divergence=divergence,
                 beta=beta, label_smoothing=0.1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0])
def test_temperatures(temperature, path):
    """T = 1 and T = 2 share the student's exponentials with CE; other T use a third stream."""
    student, teacher, target = inputs(4, 600, seed=2)
    for divergence in ("kl", "jsd") if temperature >= 1.0 else ("kl",):
        check_kernel(student, teacher, target, path=path, divergence=divergence,
                     temperature=temperature, alpha=0.4, label_smoothing=0.2)


@pytest.mark.parametrize("path", PATHS)
def test_jsd_near_one_hot(path):
    kernel_checks.check_jsd_near_one_hot(run_kernel, inputs, path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_FOUR, ids=FOUR_IDS)
def test_low_temperature_float32(divergence, beta, path):
    """T = 0.5: the jsd / tvd gradients are differences of O(1) row sums that cancel
    (b p_t (ln(p_t/m) - K_t) with ln(p_t/m) ~ K_t), so float32 arithmetic itself cannot reach
    1e-5 in the max norm: the eager float32 formula errs by ~2e-5. Here the kernel is held to
    1e-5 or, where float32 cannot get there, to twice the eager float32 error."""
    student, teacher, target = inputs(4, 600, seed=3)
    kernel_checks.check_low_temperature(run_kernel, student, teacher, target,
                                        divergence=divergence, beta=beta, label_smoothing=0.1,
                                        path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_FOUR, ids=FOUR_IDS)
def test_softcap(divergence, beta, path):
    student, teacher, target = inputs(4, 700, scale=8.0, seed=4)
    check_kernel(student, teacher, target, path=path, divergence=divergence, beta=beta,
                 softcap=5.0, label_smoothing=0.1)


def masked_columns(n, vocab, fraction=0.3, seed=0):
    """(n, vocab) -inf mask, different per row; the last column (the label) stays finite.
    Row 1 ends in whole -inf chunks, row 3 starts with one (the running max stays -inf)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, vocab, generator=g) < fraction
    mask[1, 300:] = True
    mask[3, :600] = True
    mask[:, -1] = False
    return mask.to(DEVICE)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("student_padded", [False, True], ids=["student-finite", "padded"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_FOUR, ids=FOUR_IDS)
def test_neg_inf_columns(divergence, beta, student_padded, path):
    kernel_checks.skip_infinite_reverse_kl(divergence, student_padded)
    student, teacher, _ = inputs(4, 1000, seed=5)
    mask = masked_columns(4, 1000, seed=5)
    student, teacher = kernel_checks.mask_logits(student, teacher, mask, student_padded)
    target = torch.full((4,), 999, dtype=torch.int64, device=DEVICE)
    target[2] = -100
    _, gs, gt = check_kernel(student, teacher, target, path=path, divergence=divergence,
                             beta=beta)
    kernel_checks.assert_masked_gradients_zero(gs, gt, mask, student_padded)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_FOUR, ids=FOUR_IDS)
def test_extreme_logits(divergence, beta, path):
    student, teacher, target = inputs(4, 900, scale=1e4, seed=21)
    assert student.abs().max() > 1e4
    # Saturated softmaxes leave gradients of ~1e-40 that cancel: judge the error against the
    # gradient's natural unit, div_weight / T = (1 - alpha) * T.
    check_kernel(student, teacher, target, atol=1e-5 * 0.7 * 2.0, path=path,
                 divergence=divergence, beta=beta, label_smoothing=0.1)


@pytest.mark.parametrize("path", PATHS)
def test_ignored_rows_and_all_ignored(path):
    student, teacher, target = inputs(6, 1000, ignore_fraction=0.5, seed=6)
    target[0], target[1] = -100, 3
    rows, gs, gt = check_kernel(student, teacher, target, path=path, divergence="jsd")
    kernel_checks.assert_ignored_rows_zero(rows, gs, gt, target == -100)
    target.fill_(-100)
    rows, gs, gt = run_kernel(student, teacher, target, path=path)
    assert bool((rows == 0).all()) and bool((gs == 0).all()) and bool((gt == 0).all())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence", ["kl", "tvd"])
def test_no_target(divergence, path):
    student, teacher, _ = inputs(5, 1000, seed=7)
    check_kernel(student, teacher, None, path=path, divergence=divergence,
                 temperature=0.5 if divergence == "kl" else 1.0)


@pytest.mark.parametrize("path", PATHS)
def test_zero_weight_term_is_not_evaluated(path):
    """alpha=1: the divergence (infinite here) has weight 0, the teacher is never read and its
    gradient is 0; alpha=0: CE has weight 0 and the target only masks rows."""
    student, teacher, target = inputs(4, 1000, seed=9)
    kernel_checks.check_zero_weight_terms(run_kernel, check_kernel, student, teacher, target,
                                          path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_forward_only(divergence, path):
    student, teacher, target = inputs(4, 1000, seed=10)
    rows, gs, gt = run_kernel(student, teacher, target, path=path, divergence=divergence,
                              grad_student=False, grad_teacher=False)
    assert gs is None and gt is None
    assert_close(rows, oracle_rows(student, teacher, target, divergence=divergence)[0])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence", ["kl", "tvd"])
def test_inplace_student_gradient(divergence, path):
    """grad_student aliases student: every element is written after its last read."""
    student, teacher, target = inputs(4, 1000, seed=12)
    rows, gs, _ = run_kernel(student, teacher, target, path=path, inplace=True,
                             grad_teacher=False, divergence=divergence, label_smoothing=0.1)
    ref_rows, ref_gs, _ = oracle_rows(student, teacher, target, divergence=divergence,
                                      label_smoothing=0.1)
    assert_close(rows, ref_rows, what="rows")
    assert_close(gs, ref_gs, what="student grad (in place)")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_FOUR, ids=FOUR_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision(dtype, divergence, beta, path):
    student, teacher, target = inputs(4, 1000, dtype, seed=17)
    kw = dict(divergence=divergence, beta=beta, label_smoothing=0.1)
    kernel = run_kernel(student, teacher, target, path=path, **kw)
    exact = oracle_rows(student, teacher, target, **kw)
    eager = oracle_rows(student, teacher, target, dtype, **kw)
    assert kernel[1].dtype == dtype and kernel[2].dtype == dtype
    for what, k, x, e in zip(("rows", "student grad", "teacher grad"), kernel, exact, eager):
        half_ulp = 2.0**-24 if what == "rows" else HALF_ULP[dtype]
        kernel_checks.low_precision_check(k, x, e, half_ulp, what)


def run_api(student, teacher, target, *, inplace_backward=False, teacher_grad=True, **kw):
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = fastkd.distillation_loss(s, t, target, backend="triton",
                                    inplace_backward=inplace_backward, **kw)
    loss.backward()
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_public_api(divergence, beta, reduction):
    student, teacher, target = inputs(6, 333, seed=31)
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=beta,
              reduction=reduction, label_smoothing=0.1)
    loss, gs, gt = run_api(student, teacher, target, **kw)
    ref = oracle_with_grads(student.cpu(), teacher.cpu(), target.cpu(), **kw)
    for what, a, e in zip(("loss", "student grad", "teacher grad"), (loss, gs, gt), ref):
        assert_close(a, e, what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_public_api_inplace_backward(dtype):
    student, teacher, target = inputs(2, 3 * 111, dtype, seed=32)
    student3, teacher3 = student.reshape(2, 3, 111), teacher.reshape(2, 3, 111)
    target3 = random_target(2, 3, vocab=111, ignore_fraction=0.3, seed=32).to(DEVICE)
    kw = dict(temperature=2.0, alpha=0.5, reduction="mean")
    loss, gs, gt = run_api(student3, teacher3, target3, inplace_backward=True,
                           teacher_grad=False, **kw)
    exact = oracle_with_grads(student3.cpu(), teacher3.cpu(), target3.cpu(), False, **kw)
    if dtype == torch.float32:
        assert_close(loss, exact[0], what="loss")
        assert_close(gs, exact[1], what="student grad")
    else:
        eager = oracle_with_grads(student3.cpu(), teacher3.cpu(), target3.cpu(), False,
                                  dtype=dtype, **kw)
        kernel_checks.low_precision_check(loss, exact[0], eager[0], 2.0**-24, "loss")
        kernel_checks.low_precision_check(gs, exact[1], eager[1], HALF_ULP[dtype], "student grad")
    assert gt is None


def test_bad_inputs_name_the_argument():
    student, teacher, target = inputs(3, 10)
    kernel_checks.assert_bad_inputs_name_the_argument(
        kernel_checks.launcher(triton_dense.launch_dense_kd), student, teacher, target)


def test_custom_op_opcheck():
    student, teacher, target = inputs(3, 37, seed=40)
    gs, gt = kernel_checks.poisoned(student), kernel_checks.poisoned(teacher)
    args = (student, teacher, target, gs, gt, None, 2.0, 0.3, 2.8, 0, 0.0, 0.0, -100, 0.1, 0.0)
    torch.library.opcheck(torch.ops.fastkd.dense_kd_triton.default, args)
    no_grads = (student, teacher, None, None, None, None, 1.0, 0.0, 1.0, 2, 0.5, 0.0, -100, 0.0,
                3.0)
    torch.library.opcheck(torch.ops.fastkd.dense_kd_triton.default, no_grads)
    torch.library.opcheck(torch.ops.fastkd.dense_kd_triton_loss.default,
                          (student, teacher, target, 2.0, 0.3, 2.8, 3, 0.0, 0.0, -100, 0.1, 0.0))


def test_raw_entry_point_matches_launcher():
    """`dense_kd_triton` (through the custom op) == the launcher, bit for bit."""
    student, teacher, target = inputs(4, 100, seed=41)
    gs, gt = kernel_checks.poisoned(student), kernel_checks.poisoned(teacher)
    args = kernel_checks.scalars(True, divergence="reverse_kl", label_smoothing=0.1)
    rows = triton_dense.dense_kd_triton(student, teacher, target, gs, gt, None, args)
    ref = run_kernel(student, teacher, target, divergence="reverse_kl", label_smoothing=0.1)
    for a, b in zip((rows, gs, gt), ref):
        assert torch.equal(a, b)


def compiled_matches_eager():
    student, teacher, target = inputs(4, 64, seed=42)
    kernel_checks.assert_compiled_matches_eager(fastkd.distillation_loss, student, teacher,
                                                target, backend="triton",
                                                **kernel_checks.COMPILE_OPTIONS)


def test_torch_compile_fullgraph():
    compiled_matches_eager()


def test_torch_compile_fullgraph_forward_only():
    """No gradient buffers: the functional loss op, which inductor can compile."""
    student, teacher, target = inputs(4, 64, seed=43)

    def loss(s, t, y):
        return fastkd.distillation_loss(s, t, y, temperature=2.0, backend="triton")

    with torch.no_grad():
        assert_close(torch.compile(loss, fullgraph=True)(student, teacher, target),
                     loss(student, teacher, target), rtol=1e-6, what="loss")


SM90_COMPILE = r"""
import os, re, subprocess, sys, tempfile, triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastkd.kernels import dense_kd
from fastkd.ops.triton_dense import _launch_config
ptr = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
names = ("scale grad_div ce_weight div_weight beta smoothing softcap").split()
hinton = dict(HAS_TARGET=True, EVAL_CE=True, HAS_CE=True, HAS_SMOOTH=True, EVAL_DIV=True,
              HAS_DIV=True, DIV=0, CE_POW=2, HAS_SOFTCAP=False, NEED_GS=True, NEED_GT=False,
              TERMS=False)
jsd = dict(hinton, DIV=2, CE_POW=0, HAS_SOFTCAP=True, NEED_GT=True)
cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
for s_type, t_type, flags, vocab in (
        ("bf16", "bf16", hinton, 8192), ("bf16", "fp32", dict(hinton, TERMS=True), 128256),
        ("fp32", "fp32", jsd, 1000), ("fp16", "bf16", dict(jsd, TERMS=True), 151936)):
    single, _, blocks, warps = _launch_config(8, vocab, flags["HAS_SOFTCAP"], 8192, 2048)
    kernel = dense_kd.dense_kd_single_kernel if single else dense_kd.dense_kd_multipass_kernel
    consts = dict(flags, **blocks) if single else dict(flags, PAIR_PASS=flags["DIV"] >= 2,
                                                         **blocks)
    sig = dict(s_ptr=ptr[s_type], gs_ptr=ptr[s_type], t_ptr=ptr[t_type], gt_ptr=ptr[t_type])
    sig.update(y_ptr="*i64", rows_ptr="*fp32", terms_ptr="*fp32", N="i32", V="i32",
               ignore_index="i32", **{f"stride_{n}": "i64" for n in ("s", "t", "gs", "gt")})
    sig.update({n: "fp32" for n in names}, **{k: "constexpr" for k in consts})
    sig = {n: sig[n] for n in kernel.arg_names}
    src = ASTSource(kernel, sig, {(kernel.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})
    usage = ""
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            out = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True,
                                 text=True).stdout
        usage = " ".join(re.findall(r"(REG:\d+|STACK:\d+|LOCAL:\d+)", out))
    print("compiled", s_type, t_type, vocab, "single" if single else "multi", warps, "warps",
          "terms" if flags["TERMS"] else "", usage)
"""


def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile both kernels for an H100
    (sm_90) to cubin with the launcher's sizes, mixed dtypes and the terms output; needs
    Triton's bundled ptxas, not a GPU. Prints registers / stack / local memory per kernel."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("Triton's CUDA backend (ptxas) is not installed")
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert out.stdout.count("compiled") == 4


# ---------------------------------------------------------------- GPU, real sizes
GPU_VOCABS = [32000, 128256, 151936, 262144]


@gpu
@compiled_kernels
@needs_cuda
@pytest.mark.parametrize("vocab", GPU_VOCABS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_gpu_real_vocab_bf16(divergence, beta, vocab):
    n = 16
    g = torch.Generator().manual_seed(vocab)
    student = (torch.randn(n, vocab, generator=g) * 3).bfloat16().cuda()
    teacher = (torch.randn(n, vocab, generator=g) * 3).bfloat16().cuda()
    target = random_target(n, vocab=vocab, ignore_fraction=0.25, seed=vocab).cuda()
    if divergence != "reverse_kl":  # reverse KL is +inf against a masked teacher
        teacher[0, vocab // 2:] = float("-inf")
    kw = dict(divergence=divergence, beta=beta, label_smoothing=0.1)
    rows, gs, gt = run_kernel(student, teacher, target, **kw)
    exact = oracle_rows(student, teacher, target, **kw)
    eager = oracle_rows(student.cuda(), teacher, target, torch.bfloat16, **kw)
    for what, k, x, e in zip(("rows", "student grad", "teacher grad"), (rows, gs, gt), exact,
                             eager):
        half_ulp = 2.0**-24 if what == "rows" else HALF_ULP[torch.bfloat16]
        kernel_checks.low_precision_check(k, x, e, half_ulp, what)


@gpu
@compiled_kernels
@needs_cuda
@pytest.mark.parametrize("vocab", [32000, 128256])
def test_gpu_real_vocab_fp32_and_inplace(vocab):
    student, teacher, target = (x.cuda() for x in inputs(8, vocab, seed=vocab))
    check_kernel(student, teacher, target, label_smoothing=0.1, softcap=30.0)
    rows, gs, _ = run_kernel(student, teacher, target, inplace=True, grad_teacher=False)
    ref_rows, ref_gs, _ = oracle_rows(student, teacher, target)
    assert_close(rows, ref_rows, what="rows")
    assert_close(gs, ref_gs, what="student grad (in place)")


@gpu
@compiled_kernels
@needs_cuda
def test_gpu_int64_offsets():
    """N * V > 2**31: rows past the int32 range are read and written at the right place."""
    vocab, n = 262144, 8200
    student = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16) * 3
    teacher = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16) * 3
    target = torch.randint(0, vocab, (n,), device="cuda")
    rows, gs, _ = run_kernel(student, teacher, target, grad_teacher=False)
    tail = slice(n - 3, n)
    ref_rows, ref_gs, _ = oracle_rows(student[tail], teacher[tail], target[tail])
    assert_close(rows[tail], ref_rows, what="rows past 2**31")
    err, scale = kernel_checks.max_error(gs[tail], ref_gs)
    assert err <= HALF_ULP[torch.bfloat16] * scale * 4, f"student grad past 2**31: {err:.3e}"


@gpu
@compiled_kernels
@needs_cuda
def test_gpu_torch_compile_fullgraph():
    assert not ON_CPU
    compiled_matches_eager()
