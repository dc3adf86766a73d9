"""The Triton dense kernels on inputs as users hold them (raw launcher, float64 oracle).

- Mixed dtypes: every (student, teacher) pair of float32 / bfloat16 / float16, each loaded in
  its own dtype, each gradient stored in its input's dtype.
- Strided rows: operands that are slices of larger buffers or rows of `logits[:, :-1]`, read
  in place, with in-place gradients landing in the original storage.
- Loss terms: the optional (N, 2) float32 `terms` output (unweighted CE and divergence per
  row) against the oracle, the rows identity, zero weights, no target, both custom ops.

Both kernels are reached on small shapes under TRITON_INTERPRET=1 (the multi-pass one with
128-element chunks); outputs are NaN-poisoned before the kernel writes them. The @gpu test
repeats the mixed / strided / terms check at a real vocabulary on CUDA.
"""

from __future__ import annotations

import kernel_checks
import oracle
import pytest
import torch
from kernel_checks import assert_close, oracle_rows
from triton_checks import DEVICE, DIVERGENCE_FOUR, FOUR_IDS, ON_CPU, module_marks

triton = pytest.importorskip("triton")
triton_dense = pytest.importorskip("fastkd.ops.triton_dense")

pytestmark = module_marks()

#: Paths for V <= 300: the multi-pass kernel with 128-element chunks (several, last partial).
SMALL_PATHS = {"single": {}, "multi": dict(max_single_v=0, block_v=128)}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
PAIRS = [(s, t) for s in DTYPES for t in DTYPES]


def run_small(student, teacher, target, *, path="single", terms=False, **kw):
    """Raw launch on SMALL_PATHS: (rows, grad_student, grad_teacher[, terms]); the terms
    buffer is poisoned with NaN first."""
    buf = torch.full((student.shape[0], 2), float("nan"), device=student.device)
    launch = kernel_checks.launcher(triton_dense.launch_dense_kd, buf if terms else None,
                                    **SMALL_PATHS[path])
    got = kernel_checks.run_raw(launch, student, teacher, target, **kw)
    return (*got, buf) if terms else got


#: Relative error of one float32 -> dtype store: half an ulp (round to nearest even), except
#: that Triton's interpreter truncates float32 -> bfloat16 (a whole ulp; the GPU rounds).
STORE_ROUNDING = {dtype: torch.finfo(dtype).eps / 2 for dtype in DTYPES.values()}
if ON_CPU:
    STORE_ROUNDING[torch.bfloat16] = torch.finfo(torch.bfloat16).eps


def assert_rounded_once(actual, exact, what):
    """Float32 arithmetic on exactly represented inputs, one final rounding to the output's
    dtype: max error <= (1e-5 + STORE_ROUNDING[dtype]) * max |exact|. Stricter than the
    eager-error bound of a same-dtype formula (which rounds at every step)."""
    kernel_checks.assert_close(actual, exact, rtol=1e-5 + STORE_ROUNDING[actual.dtype],
                               what=what)


def check_mixed(student, teacher, target, **kw):
    """Rows and both gradients against the float64 oracle on the same (rounded) values; each
    gradient in its own input's dtype. Returns the kernel outputs."""
    got = run_small(student, teacher, target, **kw)
    exact = oracle_rows(student, teacher, target, **kw)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == student.dtype and got[2].dtype == teacher.dtype
    for what, k, x in zip(kernel_checks.OUTPUTS, got, exact):
        assert_rounded_once(k, x, what)
    return got


def pair_inputs(n, vocab, s_dtype, t_dtype, seed=0, scale=3.0):
    """Normal logits, the student in `s_dtype`, the teacher in `t_dtype` (each rounded once)."""
    student, teacher, target = kernel_checks.inputs(n, vocab, torch.float64, 0.3, scale, seed,
                                                    device=DEVICE)
    return student.to(s_dtype), teacher.to(t_dtype), target


@pytest.mark.parametrize("path", SMALL_PATHS)
@pytest.mark.parametrize("pair", PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
def test_mixed_dtype_pairs(pair, path):
    """Every (student, teacher) dtype pair, teacher gradient included; the divergence
    rotates with the pair so each pair meets a different one over the parameters."""
    s_dtype, t_dtype = DTYPES[pair[0]], DTYPES[pair[1]]
    i = PAIRS.index(pair)
    divergence, beta = DIVERGENCE_FOUR[i % 4]
    student, teacher, target = pair_inputs(5, 300, s_dtype, t_dtype, seed=50 + i)
    target[2] = -100
    check_mixed(student, teacher, target, path=path, divergence=divergence, beta=beta,
                temperature=2.0 if i % 2 else 0.7, label_smoothing=0.1,
                softcap=20.0 if i % 3 == 0 else None)


@pytest.mark.parametrize("path", SMALL_PATHS)
def test_mixed_dtypes_in_place(path):
    """bf16 student written in place next to an fp32 teacher (no teacher gradient)."""
    student, teacher, target = pair_inputs(4, 257, torch.bfloat16, torch.float32, seed=60)
    rows, gs, _ = run_small(student, teacher, target, path=path, inplace=True,
                            grad_teacher=False, divergence="jsd")
    exact = oracle_rows(student, teacher, target, divergence="jsd")
    assert gs.dtype == torch.bfloat16
    assert_rounded_once(rows, exact[0], "rows")
    assert_rounded_once(gs, exact[1], "student grad (in place)")


def strided_view(buffer, rows, vocab, row_step, col0):
    """(rows, vocab) view of `buffer` starting at column col0 of row 0, taking every
    row_step-th row: stride(1) == 1, stride(0) == row_step * buffer.stride(0)."""
    view = buffer[::row_step][:rows, col0:col0 + vocab]
    assert view.stride(1) == 1 and not view.is_contiguous()
    assert view.data_ptr() == buffer.data_ptr() + col0 * buffer.element_size()
    return view


@pytest.mark.parametrize("path", SMALL_PATHS)
@pytest.mark.parametrize("pair", [("f32", "f32"), ("bf16", "f32"), ("f16", "bf16")],
                         ids=["f32-f32", "bf16-f32", "f16-bf16"])
def test_strided_rows_read_and_written_in_place(pair, path):
    """Student, teacher, grad_teacher: slices of larger buffers, each with its own row
    stride; grad_student is the student view itself. The gradients land in the original
    storage and every element outside the views is left as it was."""
    s_dtype, t_dtype = DTYPES[pair[0]], DTYPES[pair[1]]
    n, vocab = 5, 200
    s_big = oracle.random_logits(n, vocab + 37, seed=70, dtype=s_dtype).to(DEVICE)
    t_big = oracle.random_logits(2 * n, vocab + 11, seed=71, dtype=t_dtype).to(DEVICE)
    gt_big = torch.full((n, vocab + 64), float("nan"), dtype=t_dtype, device=DEVICE)
    student = strided_view(s_big, n, vocab, 1, 5)
    teacher = strided_view(t_big, n, vocab, 2, 3)
    grad_teacher = strided_view(gt_big, n, vocab, 1, 64)
    target = oracle.random_target(n, vocab=vocab, ignore_fraction=0.3, seed=70).to(DEVICE)
    target[0] = 7
    kw = dict(divergence="kl", temperature=2.0, label_smoothing=0.1)
    exact = oracle_rows(student.clone(), teacher, target, **kw)
    s_before, t_before = s_big.clone(), t_big.clone()
    rows = kernel_checks.launcher(triton_dense.launch_dense_kd, **SMALL_PATHS[path])(
        *kernel_checks.kernel_args(student, teacher, target, student, grad_teacher, **kw))
    assert_rounded_once(rows, exact[0], "rows")
    assert_rounded_once(s_big[:, 5:5 + vocab], exact[1], "student grad in s_big")
    assert_rounded_once(gt_big[:, 64:], exact[2], "teacher grad in gt_big")
    assert torch.equal(s_big[:, :5], s_before[:, :5])
    assert torch.equal(s_big[:, 5 + vocab:], s_before[:, 5 + vocab:])
    assert bool(gt_big[:, :64].isnan().all()), "grad_teacher written outside its view"
    assert torch.equal(t_big, t_before), "the teacher was written"


@pytest.mark.parametrize("path", SMALL_PATHS)
def test_shifted_slice_rows_per_batch(path):
    """`logits[:, :-1]` (B, T-1, V), one 2-D launch per batch as the op layer does, gradient
    in place; then the transposed batch `logits[:, t]` (B rows of stride T*V)."""
    b, t, vocab = 2, 4, 150
    logits = oracle.random_logits(b, t, vocab, seed=80, dtype=torch.bfloat16).to(DEVICE)
    teacher = oracle.random_logits(b, t, vocab, seed=81).to(DEVICE)
    labels = oracle.random_target(b, t, vocab=vocab, ignore_fraction=0.2, seed=80).to(DEVICE)
    original = logits.clone()
    shifted, t_shifted = logits[:, :-1], teacher[:, :-1]
    kw = dict(divergence="reverse_kl", temperature=1.5)
    for i in range(b):
        rows_i, t_rows = shifted[i], t_shifted[i]
        assert rows_i.data_ptr() == logits.data_ptr() + i * t * vocab * logits.element_size()
        y = labels[i, 1:].contiguous()
        exact = oracle_rows(original[i, :-1], t_rows, y, **kw)
        rows = kernel_checks.launcher(triton_dense.launch_dense_kd, **SMALL_PATHS[path])(
            *kernel_checks.kernel_args(rows_i, t_rows, y, rows_i, None, **kw))
        assert_rounded_once(rows, exact[0], f"rows of batch {i}")
        assert_rounded_once(logits[i, :-1], exact[1], f"student grad of batch {i} (in place)")
    assert torch.equal(logits[:, -1], original[:, -1]), "the last position was written"
    column = original[:, 1]  # (B, V), row stride T * V
    assert column.stride(0) == t * vocab
    check_mixed(column, teacher[:, 2], labels[:, 0].contiguous(), path=path, **kw)


def terms_oracle(student, teacher, target, **kw):
    """(CE, D) per row from the float64 oracle: alpha=1 isolates CE (0 without a target);
    target=None with scale_by_t2=False gives D; ignored rows 0."""
    zero = torch.zeros(student.shape[0], dtype=torch.float64)
    ce = zero if target is None else oracle_rows(student, teacher, target, **dict(kw, alpha=1.0))[0]
    d = oracle_rows(student, teacher, None, **dict(kw, scale_by_t2=False))[0]
    if target is not None:
        d = torch.where(target.cpu() == kw.get("ignore_index", -100), 0.0, d)
    return torch.stack([ce, d], dim=1)


@pytest.mark.parametrize("path", SMALL_PATHS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_FOUR, ids=FOUR_IDS)
def test_terms_match_oracle_and_rows(divergence, beta, path):
    """terms[:, 0] = unweighted CE, terms[:, 1] = unweighted D against the oracle, and
    rows == ce_weight * CE + div_weight * D, with gradients unchanged by asking for terms."""
    student, teacher, target = pair_inputs(6, 290, torch.float32, torch.bfloat16, seed=90)
    target[1] = -100
    kw = dict(divergence=divergence, beta=beta, temperature=2.0, alpha=0.3,
              label_smoothing=0.1)
    rows, gs, gt, terms = run_small(student, teacher, target, path=path, terms=True, **kw)
    assert_close(terms, terms_oracle(student, teacher, target, **kw), what="terms")
    assert bool((terms[1] == 0).all()), "an ignored row has zero terms"
    ce_weight, div_weight = kernel_checks.weights(True, 0.3, 2.0, True)
    assert_close(rows, ce_weight * terms[:, 0] + div_weight * terms[:, 1], rtol=1e-6,
                 what="rows vs weighted terms")
    plain = run_small(student, teacher, target, path=path, **kw)
    for what, a, b in zip(kernel_checks.OUTPUTS, (rows, gs, gt), plain):
        assert torch.equal(a, b), f"{what} changed when terms were requested"


@pytest.mark.parametrize("path", SMALL_PATHS)
def test_terms_at_zero_weights_and_without_target(path):
    """Both terms are evaluated at weight 0 (an infinite D at weight 0 stays out of rows and
    gradients); without a target CE is 0; forward only (the functional op) alike."""
    student, teacher, target = pair_inputs(4, 260, torch.float32, torch.float32, seed=91)
    teacher[:, 9] = float("-inf")  # reverse KL = +inf on every row
    kw = dict(path=path, divergence="reverse_kl", temperature=2.0)
    rows, gs, gt, terms = run_small(student, teacher, target, alpha=1.0, terms=True, **kw)
    # alpha=1: the oracle's 0 * inf would be NaN; the teacher does not enter its rows.
    exact = oracle_rows(student, teacher.nan_to_num(neginf=0.0), target, alpha=1.0,
                        divergence="reverse_kl", temperature=2.0)
    valid = target != -100
    assert_close(rows, exact[0], what="rows (alpha=1)")
    assert_close(gs, exact[1], what="student grad (alpha=1)")
    assert bool((gt == 0).all())
    assert_close(terms[:, 0], exact[0], what="CE term (alpha=1)")
    assert bool(torch.isinf(terms[valid, 1]).all()) and bool((terms[~valid] == 0).all())
    teacher[:, 9] = 1.0
    for alpha, y in ((0.0, target), (0.5, None)):
        options = dict(divergence="jsd", temperature=0.8, alpha=alpha, label_smoothing=0.2)
        want = terms_oracle(student, teacher, y, **options)
        _, _, _, terms = run_small(student, teacher, y, path=path, terms=True, **options)
        assert_close(terms, want, what=f"terms (alpha={alpha}, target={y is not None})")
        if path != "single":
            continue
        buf = torch.full((4, 2), float("nan"), device=DEVICE)
        args = kernel_checks.kernel_args(student, teacher, y, None, None, buf, **options)
        triton_dense.dense_kd_triton(*args)  # the forward-only functional op
        assert_close(buf, want, what="terms (forward only)")



@pytest.mark.parametrize("path", SMALL_PATHS)
@pytest.mark.parametrize("pair", [("bf16", "f32"), ("f32", "f16"), ("f16", "bf16")],
                         ids=["bf16-f32", "f32-f16", "f16-bf16"])
def test_shared_layout_dtypes_terms_check(pair, path):
    """The cross-backend check of tests/kernel_checks.py (strided rows everywhere, per-side
    dtypes, NaN-poisoned terms), the same one every dense backend passes."""
    student, teacher, target = pair_inputs(5, 230, DTYPES[pair[0]], DTYPES[pair[1]], seed=46)
    launch = kernel_checks.launcher(triton_dense.launch_dense_kd, **SMALL_PATHS[path])
    kernel_checks.check_layout_dtypes_terms(launch, student, teacher, target, divergence="jsd",
                                            beta=0.3, label_smoothing=0.1)

def test_layout_and_dtype_errors_name_the_argument():
    """What the kernels cannot index raises, naming the argument; what they can (strided
    rows, mixed dtypes, a broadcast teacher row) is accepted without a copy."""
    student, teacher, target = pair_inputs(3, 10, torch.float32, torch.bfloat16, seed=45)
    opts = kernel_checks.VALID_SCALARS
    launch = triton_dense.launch_dense_kd  # its arguments: the op's, terms after the buffers
    cases = [
        (TypeError, "teacher", (student, teacher.double(), target, None, None)),
        (TypeError, "grad_student", (student, teacher, target, student.half(), None)),
        (TypeError, "grad_teacher", (student, teacher, target, None, student.clone())),
        (ValueError, "student", (student.t().contiguous().t(), teacher, target, None, None)),
        (ValueError, "grad_teacher", (student, teacher, target, None, teacher[:1].expand(3, 10))),
    ]
    for error, name, args in cases:
        with pytest.raises(error, match=name):
            launch(*args, None, *opts)
    for bad in (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 3), torch.zeros(2, 3).t()):
        with pytest.raises((TypeError, ValueError), match="terms"):
            launch(student, teacher, target, None, None, bad.to(DEVICE), *opts)
    broadcast = teacher[:1].expand(3, 10)  # stride(0) == 0: read, never written
    kw = dict(divergence="tvd", temperature=1.5)
    _, gs, _ = run_small(student, broadcast, target, grad_teacher=False, **kw)
    assert_rounded_once(gs, oracle_rows(student, broadcast, target, **kw)[1],
                        "student grad against a broadcast teacher row")

def test_custom_ops_opcheck_with_terms():
    """Both ops with the terms output, mixed dtypes and a strided student."""
    student, teacher, target = pair_inputs(3, 37, torch.bfloat16, torch.float32, seed=40)
    wide = oracle.random_logits(3, 50, dtype=torch.bfloat16, seed=41).to(DEVICE)
    gs = torch.full_like(student, float("nan"))
    gt = torch.full_like(teacher, float("nan"))
    terms = torch.full((3, 2), float("nan"), device=DEVICE)
    args = (wide[:, 5:42], teacher, target, gs, gt, terms, 2.0, 0.3, 2.8, 2, 0.5, 0.0, -100, 0.1,
            0.0)
    torch.library.opcheck(torch.ops.fastkd.dense_kd_triton.default, args)
    torch.library.opcheck(torch.ops.fastkd.dense_kd_triton_loss.default,
                          (wide[:, 5:42], teacher, None, 2.0, 0.0, 4.0, 1, 0.0, 0.0, -100, 0.0,
                           0.0, True))


def test_raw_entry_point_with_terms():
    """`dense_kd_triton` (through either custom op, with terms) == the launcher, bit for bit."""
    student, teacher, target = pair_inputs(4, 100, torch.float16, torch.float32, seed=41)
    gs, gt = kernel_checks.poisoned(student), kernel_checks.poisoned(teacher)
    terms = torch.full((4, 2), float("nan"), device=DEVICE)
    args = kernel_checks.VALID_ARGS._replace(ce_weight=0.3, div_weight=2.8, divergence=1,
                                             label_smoothing=0.1)
    rows = triton_dense.dense_kd_triton(student, teacher, target, gs, gt, terms, args)
    ref = run_small(student, teacher, target, terms=True, divergence="reverse_kl",
                    label_smoothing=0.1)
    for a, b in zip((rows, gs, gt, terms), ref):
        assert torch.equal(a, b)
    fwd_terms = torch.full((4, 2), float("nan"), device=DEVICE)
    fwd_rows = triton_dense.dense_kd_triton(student, teacher, target, None, None, fwd_terms,
                                            args)
    assert torch.equal(fwd_rows, rows) and torch.equal(fwd_terms, terms)


@pytest.mark.parametrize("grads", [False, True], ids=["forward", "with-grads"])
def test_torch_compile_fullgraph_terms(grads):
    """`dense_kd_triton(..., terms=...)` traced whole by torch.compile: the mutating op
    (terms a mutated argument) and the functional forward op give the eager outputs."""
    student, teacher, target = pair_inputs(4, 64, torch.bfloat16, torch.float32, seed=44)

    def step(s, t, y):
        terms = torch.empty(s.shape[0], 2, device=s.device)
        gs = torch.empty_like(s) if grads else None
        args = kernel_checks.VALID_ARGS._replace(ce_weight=0.3, div_weight=2.8, divergence=2,
                                                 param_a=0.5, label_smoothing=0.1)
        rows = triton_dense.dense_kd_triton(s, t, y, gs, None, terms, args)
        return rows, terms, gs

    eager = step(student, teacher, target)
    compiled = torch.compile(step, fullgraph=True)(student, teacher, target)
    for a, b in zip(eager, compiled):
        assert (a is None and b is None) or torch.equal(a, b)



@pytest.mark.gpu
@pytest.mark.skipif(ON_CPU or not torch.cuda.is_available(),
                    reason="real sizes need compiled kernels on CUDA (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("vocab", [32000, 128256])
def test_gpu_mixed_strided_terms(vocab):
    """Compiled kernels at a real vocabulary: bf16 student rows of a transposed batch
    (`logits[:, 1]`, row stride T*V) against every other row of an fp32 teacher, with both
    gradients and terms; then the student gradient in place into `logits` (bf16 rounded to
    nearest even on the GPU: half an ulp)."""
    b, t = 6, 3
    logits = oracle.random_logits(b, t, vocab, dtype=torch.bfloat16, seed=vocab).cuda()
    teacher = oracle.random_logits(2 * b, vocab, seed=vocab + 1).cuda()
    labels = oracle.random_target(b, vocab=vocab, ignore_fraction=0.25, seed=vocab).cuda()
    student, t_rows = logits[:, 1], teacher[::2]
    assert student.stride(0) == t * vocab and t_rows.stride(0) == 2 * vocab
    kw = dict(divergence="jsd", temperature=2.0, label_smoothing=0.1)
    exact = oracle_rows(student, t_rows, labels, **kw)
    rows, gs, gt, terms = run_small(student, t_rows, labels, terms=True, **kw)
    for what, got, x in zip(kernel_checks.OUTPUTS, (rows, gs, gt), exact):
        assert_rounded_once(got, x, what)
    assert_close(terms, terms_oracle(student, t_rows, labels, **kw), what="terms")
    before = logits.clone()
    kernel_checks.launcher(triton_dense.launch_dense_kd)(
        *kernel_checks.kernel_args(student, t_rows, labels, student, None, **kw))
    assert_rounded_once(logits[:, 1], exact[1], "student grad in place")
    assert torch.equal(logits[:, 0], before[:, 0]) and torch.equal(logits[:, 2], before[:, 2])
