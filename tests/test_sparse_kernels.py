"""The fused top-k teacher kernels (C++ `cpu`, Triton through its interpreter, and the float32
reference) against an independent float64 oracle, called through the raw kernel contract:

    rows = kernel(student, topk_logprobs, topk_indices, target, grad_student, terms, args)

with `args` a `fastkd._kernel_args.KernelArgs` (renormalize and teacher_scale set).

Rows, the NaN-poisoned gradient buffer and the per-row (CE, D) terms are compared with the
float64 formula of tests/test_sparse.py differentiated by autograd. Also: ignored rows holding
garbage, re-tempering, k = V against the dense oracle, the exact student tail of rows whose
top-k holds nearly all the mass, bf16 / fp16 students, int32 indices and low-precision
log-probs, in-place and strided rows, opcheck and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import native_checks
import pytest
import torch
import torch.nn.functional as F
from kernel_checks import HALF_ULP, assert_close, low_precision_check, oracle_rows, poisoned
from oracle import random_logits, random_target
from test_sparse import sparse_divergence, teacher_topk

import fastkd
from fastkd._kernel_args import KernelArgs
from fastkd.reference.sparse import sparse_kd_rows

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
TAILS = ("bucket", "renormalize")


def _native():
    try:
        from fastkd.ops import sparse_native
    except Exception as exc:  # the extension is not built
        return None, f"fastkd._C is not importable ({exc})"
    return (sparse_native, None) if sparse_native.HAS_CPU else (None,
                                                                  sparse_native.MISSING_REASON)


def _triton():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None, "TRITON_INTERPRET=1 is needed to run Triton on CPU tensors"
    try:
        import triton  # noqa: F401

        from fastkd.ops import sparse_triton
    except Exception as exc:
        return None, f"Triton is not importable ({exc})"
    return sparse_triton, None


NATIVE, NATIVE_REASON = _native()
TRITON, TRITON_REASON = _triton()


def triton_chunked(student, logprobs, indices, target, grad, terms, args):
    """The Triton launch with 64-column chunks, so V = 300 takes several of them."""
    return TRITON.launch_sparse_kd(student, logprobs, indices, target, grad, terms,
                                   *args.topk_scalars(), block_v=64)


def _kernel(name):
    if name == "torch":
        return sparse_kd_rows
    if name == "cpu":
        if NATIVE is None:
            pytest.skip(f"no fused CPU kernel: {NATIVE_REASON}")
        return NATIVE.sparse_kd_native
    if TRITON is None:
        pytest.skip(f"no Triton: {TRITON_REASON}")
    return TRITON.sparse_kd_triton if name == "triton" else triton_chunked


BACKENDS = ["cpu", "triton", "triton-chunked", "torch"]
FUSED = ["cpu", "triton", "triton-chunked"]
DEFAULTS = dict(temperature=2.0, ce_weight=0.3, div_weight=2.8, divergence="kl", beta=0.5,
                ignore_index=-100, label_smoothing=0.0, softcap=0.0, tail="bucket",
                teacher_scale=1.0)


def _options(**overrides):
    o = dict(DEFAULTS, **overrides)
    param_a = o["beta"] if o["divergence"] == "jsd" else 0.0
    return o, KernelArgs(o["temperature"], o["ce_weight"], o["div_weight"],
                         DIVERGENCES.index(o["divergence"]), param_a, 0.0, o["ignore_index"],
                         o["label_smoothing"], o["softcap"], o["teacher_scale"],
                         o["tail"] == "renormalize")


def run_kernel(name, student, logprobs, indices, target, *, inplace=False, grad=True, **kw):
    """(rows, grad or None, terms) of a backend's kernel; output buffers poisoned first."""
    _, args = _options(**kw)
    student = student.clone() if inplace else student
    gs = student if inplace else (poisoned(student) if grad else None)
    terms = torch.full((student.shape[0], 2), float("nan"))
    rows = _kernel(name)(student, logprobs, indices, target, gs, terms, args)
    return rows, gs, terms


def oracle(student, logprobs, indices, target, dtype=torch.float64, **kw):
    """(rows, d sum(rows) / d student, terms) of the textbook formula in `dtype` (float64:
    exact); rows whose target is ignore_index are replaced by harmless values, then zeroed."""
    o, _ = _options(**kw)
    n, k = indices.shape
    valid = torch.ones(n, dtype=torch.bool) if target is None else target != o["ignore_index"]
    s = student.detach().to(dtype).requires_grad_(True)
    z = torch.where(valid[:, None], s, 0.0)
    if o["softcap"]:
        z = o["softcap"] * torch.tanh(z / o["softcap"])
    lp = torch.where(valid[:, None], logprobs.double(), -math.log(k + 1)) * o["teacher_scale"]
    idx = torch.where(valid[:, None], indices.long(), torch.arange(k))
    d = sparse_divergence(z, lp, idx, o["tail"], o["temperature"], o["divergence"], o["beta"])
    ce = torch.zeros_like(d)
    if target is not None:
        ce = F.cross_entropy(z, torch.where(valid, target, 0), reduction="none",
                             label_smoothing=o["label_smoothing"])
    rows = torch.where(valid, o["ce_weight"] * ce + o["div_weight"] * d, 0.0)
    (grad,) = torch.autograd.grad(rows.sum(), s)
    terms = torch.stack([torch.where(valid, ce, 0.0), torch.where(valid, d, 0.0)], dim=-1)
    return rows.detach(), grad, terms.detach()


def check(name, student, logprobs, indices, target, rtol=1e-5, **kw):
    rows, grad, terms = run_kernel(name, student, logprobs, indices, target, **kw)
    ref_rows, ref_grad, ref_terms = oracle(student, logprobs, indices, target, **kw)
    assert_close(rows, ref_rows, rtol, what="rows")
    assert_close(grad, ref_grad, rtol, what="grad")
    assert_close(terms, ref_terms, rtol, what="terms")
    assert rows.dtype == torch.float32 and grad.dtype == student.dtype
    return rows, grad, terms


def make(n=7, vocab=300, k=20, dtype=torch.float32, seed=0, temperature=2.0, ignore=0.3):
    student = random_logits(n, vocab, dtype=dtype, seed=seed)
    logprobs, indices = teacher_topk(random_logits(n, vocab, seed=seed + 1), k, temperature,
                                     shuffle_seed=seed)
    target = random_target(n, vocab=vocab, ignore_fraction=ignore, seed=seed)
    target[1] = -100
    return student, logprobs, indices, target


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_divergences_and_tails(backend, divergence, tail):
    student, logprobs, indices, target = make(seed=3)
    check(backend, student, logprobs, indices, target, divergence=divergence, tail=tail,
          beta=0.3, label_smoothing=0.1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backend", BACKENDS)
def test_temperatures_softcap_and_no_target(backend, temperature):
    """T = 1 and T = 0.7 (the CE softmax shared / from one more exponential), softcap."""
    student, logprobs, indices, target = make(seed=5, temperature=temperature)
    kw = dict(temperature=temperature, softcap=5.0, label_smoothing=0.2, tail="renormalize",
              divergence="jsd", beta=0.7)
    check(backend, student * 3, logprobs, indices, target, **kw)
    check(backend, student, logprobs, indices, None, **dict(kw, ce_weight=0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_hold_garbage(backend):
    student, logprobs, indices, target = make(seed=7, ignore=0.5)
    ignored = target == -100
    student[ignored] = float("nan")
    logprobs[ignored] = float("nan")
    indices[ignored] = torch.tensor([-5, 10**6] + [3] * 18)  # out of range and repeated
    rows, grad, terms = check(backend, student, logprobs, indices, target, divergence="tvd")
    assert bool((rows[ignored] == 0).all() and (grad[ignored] == 0).all())
    assert bool((terms[ignored] == 0).all())


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_k_equal_v_is_the_dense_loss(backend, tail):
    vocab = 37
    student = random_logits(6, vocab, seed=9)
    teacher = random_logits(6, vocab, seed=10)
    target = random_target(6, vocab=vocab, ignore_fraction=0.3, seed=9)
    for divergence in DIVERGENCES:
        logprobs, indices = teacher_topk(teacher, vocab, 2.0, softcap=6.0, shuffle_seed=1)
        rows, grad, _ = run_kernel(backend, student, logprobs, indices, target, tail=tail,
                                   divergence=divergence, softcap=6.0, label_smoothing=0.1,
                                   ce_weight=0.4, div_weight=2.4)
        ref_rows, ref_grad, _ = oracle_rows(student, teacher, target, temperature=2.0,
                                            alpha=0.4, divergence=divergence, softcap=6.0,
                                            label_smoothing=0.1)
        assert_close(rows, ref_rows, 1e-5, what=f"{divergence} rows")
        assert_close(grad, ref_grad, 1e-5, what=f"{divergence} grad")


@pytest.mark.parametrize("vocab, k", [(1, 1), (7, 3), (9, 9)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_vocabularies_and_extreme_logits(backend, vocab, k):
    """V = 1, odd V below one vector, and logits of magnitude ~1e4."""
    for scale in (3.0, 1e4):
        student = random_logits(5, vocab, scale=scale, seed=vocab)
        logprobs, indices = teacher_topk(random_logits(5, vocab, seed=vocab + 1), k, 2.0,
                                         shuffle_seed=vocab)
        target = random_target(5, vocab=vocab, ignore_fraction=0.3, seed=vocab)
        for tail in TAILS:
            # Terms of size |z| ~ 1e4 cancel in float32: an absolute floor of their rounding.
            rows, grad, terms = run_kernel(backend, student, logprobs, indices, target, tail=tail,
                                           divergence="jsd", label_smoothing=0.1)
            ref = oracle(student, logprobs, indices, target, tail=tail, divergence="jsd",
                         label_smoothing=0.1)
            atol = 1e-6 * scale
            assert_close(rows, ref[0], 1e-5, atol, what=f"{tail} rows")
            assert_close(grad, ref[1], 1e-5, 1e-6, what=f"{tail} grad")
            assert_close(terms, ref[2], 1e-5, atol, what=f"{tail} terms")


@pytest.mark.parametrize("backend", BACKENDS)
def test_retempering(backend):
    """Log-probs stored at T_stored = 1, distilled at T = 2.5: teacher_scale = 0.4."""
    student, logprobs, indices, target = make(seed=11, temperature=1.0)
    for divergence in DIVERGENCES:
        check(backend, student, logprobs, indices, target, tail="renormalize",
              temperature=2.5, teacher_scale=0.4, divergence=divergence)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_holding_nearly_all_mass(backend):
    """The student tail is ~1e-6 of its mass: computed as Z - covered it would cancel (the
    kernels then sum it directly), which the uncovered columns' gradient would show."""
    student, logprobs, indices, target = make(seed=13, k=16, ignore=0.0)
    student = student.scatter_add(-1, indices, torch.full(indices.shape, 30.0))
    for divergence in ("kl", "reverse_kl"):
        rows, grad, terms = check(backend, student, logprobs, indices, target,
                                  divergence=divergence)
        _, ref_grad, _ = oracle(student, logprobs, indices, target, divergence=divergence)
        uncovered = torch.ones_like(student, dtype=torch.bool).scatter(-1, indices, False)
        assert_close(grad[uncovered], ref_grad[uncovered], 1e-5, what="uncovered grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", FUSED)
def test_low_precision_students(backend, dtype):
    """Within twice the same-dtype eager formula's error (plus one rounding) of float64."""
    student, logprobs, indices, target = make(seed=15, dtype=dtype)
    kw = dict(divergence="jsd", label_smoothing=0.1, tail="renormalize")
    rows, grad, _ = run_kernel(backend, student, logprobs, indices, target, **kw)
    exact = oracle(student, logprobs, indices, target, **kw)
    eager = oracle(student, logprobs, indices, target, dtype=dtype, **kw)
    assert grad.dtype == dtype
    low_precision_check(rows, exact[0], eager[0], HALF_ULP[dtype], "rows")
    low_precision_check(grad, exact[1], eager[1], HALF_ULP[dtype], "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_indices_and_stored_low_precision_logprobs(backend):
    student, logprobs, indices, target = make(seed=17)
    for lp_dtype in (torch.float16, torch.bfloat16):
        check(backend, student, logprobs.to(lp_dtype), indices.int(), target,
              tail="renormalize", divergence="kl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_and_strided_rows(backend):
    """grad_student = student (in place), and rows with a row stride larger than V."""
    student, logprobs, indices, target = make(seed=19)
    rows, grad, _ = run_kernel(backend, student, logprobs, indices, target, inplace=True,
                               label_smoothing=0.1)
    ref_rows, ref_grad, _ = oracle(student, logprobs, indices, target, label_smoothing=0.1)
    assert_close(rows, ref_rows, 1e-5, what="in-place rows")
    assert_close(grad, ref_grad, 1e-5, what="in-place grad")
    wide = random_logits(student.shape[0], 330, seed=20)
    view = wide[:, 5:305]
    view.copy_(student)
    logprobs_view = torch.cat([logprobs, logprobs], dim=1)[:, :20]  # row stride 40
    check(backend, view, logprobs_view, indices, target)
    assert torch.equal(wide[:, 5:305], student)  # read only


@pytest.mark.parametrize("backend", BACKENDS)
def test_terms_when_a_weight_is_zero(backend):
    """terms holds both unweighted terms even when ce_weight or div_weight is 0."""
    student, logprobs, indices, target = make(seed=21)
    check(backend, student, logprobs, indices, target, ce_weight=0.0)
    check(backend, student, logprobs, indices, target, div_weight=0.0)


@pytest.mark.parametrize("backend", FUSED)
def test_llm_vocabulary(backend):
    """V = 32000, k = 64: long rows (several row blocks and threads on the CPU)."""
    student, logprobs, indices, target = make(n=4, vocab=32000, k=64, seed=23, ignore=0.0)
    check(backend, student, logprobs, indices, target, divergence="kl", label_smoothing=0.1)


def test_large_gradient_buffer():
    """A gradient of >= 16 MiB is written with streaming stores (rows that start on a vector
    boundary only: with V = 32771, one row in 16 at 64 bytes, one in 8 at 32 bytes), and the
    last vector of every row is partial."""
    student, logprobs, indices, target = make(n=130, vocab=32771, k=32, seed=29, ignore=0.1)
    assert student.numel() * 4 >= 16 << 20
    check("cpu", student, logprobs, indices, target, divergence="kl", label_smoothing=0.1)


VARIANT_CHECK = """
import test_sparse_kernels as t
for d in t.DIVERGENCES:
    for tail in t.TAILS:
        t.check('cpu', *t.make(seed=3), divergence=d, tail=tail, softcap=4.0)
t.test_top_k_holding_nearly_all_mass('cpu')
t.test_low_precision_students('cpu', t.torch.bfloat16)
t.test_llm_vocabulary('cpu')
t.test_large_gradient_buffer()
print("variant-ok")
"""


@pytest.mark.skipif(NATIVE is None, reason=f"no fused CPU kernel: {NATIVE_REASON}")
@pytest.mark.parametrize("variant", native_checks.CPU_VARIANTS)
def test_other_cpu_variants(variant):
    """The portable and AVX2 builds of the C++ kernel (ATEN_CPU_CAPABILITY=default / avx2) in
    a subprocess; this process runs the widest build the CPU allows (AVX-512 where present)."""
    native_checks.check_cpu_variant(VARIANT_CHECK, variant)


def _op_args(student, logprobs, indices, target, grad, terms):
    _, args = _options(divergence="jsd", label_smoothing=0.1, softcap=4.0, teacher_scale=0.5)
    return (student, logprobs, indices, target, grad, terms) + args.topk_scalars()


@pytest.mark.skipif(NATIVE is None, reason=f"no fused CPU kernel: {NATIVE_REASON}")
def test_opcheck_cpu_ops():
    student, logprobs, indices, target = make(n=4, vocab=40, k=5, seed=25)
    args = _op_args(student, logprobs, indices, target, torch.empty_like(student),
                    torch.empty(4, 2))
    torch.library.opcheck(torch.ops.fastkd.sparse_kd.default, args)
    loss_args = args[:4] + args[6:]
    torch.library.opcheck(torch.ops.fastkd.sparse_kd_loss.default, loss_args)
    torch.library.opcheck(torch.ops.fastkd.sparse_kd_check.default,
                          (logprobs, indices.int(), target != -100, 40, 1.01))


@pytest.mark.skipif(TRITON is None, reason=f"no Triton: {TRITON_REASON}")
def test_opcheck_triton_ops():
    student, logprobs, indices, target = make(n=4, vocab=40, k=5, seed=27)
    args = _op_args(student, logprobs, indices.int(), target, torch.empty_like(student),
                    torch.empty(4, 2))
    torch.library.opcheck(torch.ops.fastkd.sparse_kd_triton.default, args)
    torch.library.opcheck(torch.ops.fastkd.sparse_kd_triton_loss.default, args[:4] + args[6:])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph(backend, compiler):
    """The public loss through torch.compile(fullgraph=True), forward and backward."""
    _kernel(backend)  # skips when the backend is missing
    student, logprobs, indices, target = make(n=6, vocab=50, k=6, seed=29)
    kw = dict(tail="renormalize", temperature=2.0, teacher_temperature=1.0,
              divergence="reverse_kl", label_smoothing=0.1, backend=backend)

    def loss_fn(s, lp, idx, y):
        return fastkd.sparse_distillation_loss(s, lp, idx, y, **kw)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
    s1 = student.clone().requires_grad_(True)
    loss = compiled(s1, logprobs, indices, target)
    loss.backward()
    s2 = student.clone().requires_grad_(True)
    ref = fastkd.sparse_distillation_loss(s2, logprobs, indices, target,
                                          **dict(kw, backend="torch"))
    ref.backward()
    assert_close(loss.detach(), ref.detach(), 1e-5, what="loss")
    assert_close(s1.grad, s2.grad, 1e-5, what="grad")


SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastkd.kernels import sparse_kd
from fastkd.ops.sparse_triton import NUM_WARPS
kernel = sparse_kd.sparse_kd_kernel
hinton = dict(HAS_TARGET=True, CE_VALUE=True, CE_GRAD=True, HAS_SMOOTH=False, DIV_VALUE=True,
              DIV_GRAD=True, DIV=0, CE_POW=2, HAS_SOFTCAP=False, RENORM=True, NEED_GS=True,
              NEED_TERMS=False, BLOCK_V=2048, BLOCK_K=64)
jsd = dict(hinton, DIV=2, CE_POW=0, HAS_SMOOTH=True, HAS_SOFTCAP=True, RENORM=False,
           NEED_TERMS=True, BLOCK_K=128)
for dtype, index, consts in (("bf16", "*i32", hinton), ("fp32", "*i64", jsd)):
    sig = dict(s_ptr="*" + dtype, lp_ptr="*" + dtype, idx_ptr=index, y_ptr="*i64",
               gs_ptr="*" + dtype, rows_ptr="*fp32", terms_ptr="*fp32", V="i32", K="i32",
               s_stride="i64", gs_stride="i64", lp_stride="i64", idx_stride="i64",
               ignore_index="i64")
    sig.update({n: "fp32" for n in kernel.arg_names if n not in sig and n not in consts})
    sig.update({k: "constexpr" for k in consts})
    sig = {n: sig[n] for n in kernel.arg_names}
    src = ASTSource(kernel, sig, {(kernel.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS})
    print("compiled", dtype)
"""


@pytest.mark.skipif(TRITON is None, reason=f"no Triton: {TRITON_REASON}")
def test_triton_kernel_compiles_for_sm90():
    """The interpreter accepts code the compiler rejects: compile the kernel for an H100
    (sm_90) with Triton's bundled ptxas (no GPU needed)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("Triton's CUDA backend (ptxas) is not installed")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled") == 2


@pytest.mark.skipif(TRITON is None, reason=f"no Triton: {TRITON_REASON}")
def test_triton_refuses_k_beyond_its_register_vector(monkeypatch):
    monkeypatch.setattr(TRITON, "MAX_K", 4)
    student, logprobs, indices, target = make(n=2, vocab=30, k=5, seed=31)
    with pytest.raises(ValueError, match="k <= 4"):
        run_kernel("triton", student, logprobs, indices, target)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_autocast_keeps_float32(backend):
    """Under torch.autocast(cpu, bf16) the top-k loss still computes and returns float32."""
    _kernel(backend)
    student, logprobs, indices, target = make(n=6, vocab=50, k=5, seed=33)
    expected = fastkd.sparse_distillation_loss(student, logprobs, indices, target,
                                               backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastkd.sparse_distillation_loss(student, logprobs, indices, target,
                                               backend=backend)
    assert loss.dtype == torch.float32
    assert_close(loss, expected, 1e-6, what="loss")


@pytest.mark.parametrize("path", ["serial C++", "vectorised torch"])
def test_eager_topk_checks(path, monkeypatch):
    """Both implementations of the API's eager checks (CPU tensors use the serial op; other
    devices the vectorised one) find the first bad row and skip ignored rows."""
    from fastkd import _validation

    if path == "serial C++":
        if NATIVE is None:
            pytest.skip(f"no fused CPU kernel: {NATIVE_REASON}")
    else:
        monkeypatch.setattr(_validation, "_first_bad_rows_cpu", lambda *args: None)
    _, logprobs, indices, _ = make(n=5, vocab=30, k=4, seed=35)
    valid = torch.tensor([True, True, False, True, True])
    _validation.check_topk(logprobs, indices, (5,), 30, valid)
    cases = [(indices, "row 3 .* max 30", lambda i, lp: i[3].__setitem__(1, 30)),
             (indices, "row 4 .*repeats", lambda i, lp: i[4].__setitem__(0, int(i[4, 2]))),
             (logprobs, "row 1 .*log-sum-exp 0.69", lambda i, lp: lp[1].fill_(-math.log(2.0)))]
    for _, message, spoil in cases:
        bad_idx, bad_lp = indices.clone(), logprobs.clone()
        spoil(bad_idx, bad_lp)
        with pytest.raises(ValueError, match=message):
            _validation.check_topk(bad_lp, bad_idx, (5,), 30, valid)
        bad_idx[2], bad_lp[2] = -1, float("nan")  # an ignored row: never checked
        spoil(bad_idx, bad_lp)
        with pytest.raises(ValueError, match=message):
            _validation.check_topk(bad_lp, bad_idx, (5,), 30, valid)
    garbage_idx, garbage_lp = indices.clone(), logprobs.clone()
    garbage_idx[2], garbage_lp[2] = 99, float("nan")
    _validation.check_topk(garbage_lp, garbage_idx.int(), (5,), 30, valid)
