"""The CUDA backend (csrc/cuda/, `torch.ops.fastkd.dense_kd` on CUDA tensors) against the
independent float64 oracle.

Every test needs a CUDA device and fastkd._C built with its CUDA kernels; elsewhere they are
skipped with that reason (the kernels' maths is checked on CPU by
tests/test_cuda_math_emulation.py and their compilation by `make cuda-check`). Both kernels are
reached: FASTKD_CUDA_DENSE_PATH forces the generic (one CTA per row, several sweeps) or the
cluster kernel (Hopper: the row in distributed shared memory), FASTKD_CUDA_CLUSTER_SIZE a
cluster size; "auto" is the planner's choice. Raw op calls are checked row by row (loss rows and
d sum(rows) / d logits); `fastkd.distillation_loss(..., backend="cuda")` end to end. Outputs are
poisoned with NaN first. Tolerances: DESIGN.md §4 (fp32 1e-5 in the max norm; bf16 / fp16 at
most twice the error of the same-dtype eager formula plus one rounding).
"""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_loss, oracle_with_grads, random_logits, random_target, row_weights

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

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
DIVERGENCE_CASES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("tvd", 0.5)]
DIVERGENCE_IDS = ["kl", "reverse_kl", "jsd-0.5", "jsd-0.1", "tvd"]
PATHS = {
    "auto": {},
    "generic": {"FASTKD_CUDA_DENSE_PATH": "generic"},
    "cluster": {"FASTKD_CUDA_DENSE_PATH": "cluster"},
    "cluster16": {"FASTKD_CUDA_DENSE_PATH": "cluster", "FASTKD_CUDA_CLUSTER_SIZE": "16"},
}
HALF_ULP = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12, torch.float32: 2.0**-24}
DEFAULTS = dict(temperature=2.0, alpha=0.3, divergence="kl", beta=0.5, scale_by_t2=True,
                ignore_index=-100, label_smoothing=0.0, softcap=None)


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


def weights(target_given, alpha, temperature, scale_by_t2):
    """(ce_weight, div_weight) of DESIGN.md §1, written out independently of fastkd."""
    k = temperature**2 if scale_by_t2 else 1.0
    return (0.0, k) if not target_given else (alpha, (1.0 - alpha) * k)


def inputs(n, vocab, dtype=torch.float32, ignore_fraction=0.3, scale=3.0, seed=0):
    student = random_logits(n, vocab, scale=scale, dtype=dtype, seed=seed).cuda()
    teacher = random_logits(n, vocab, scale=scale, dtype=dtype, seed=seed + 1).cuda()
    target = random_target(n, vocab=vocab, ignore_fraction=ignore_fraction, seed=seed)
    return student, teacher, target.cuda()


def run_op(student, teacher, target, *, grad_student=True, grad_teacher=True, inplace=False,
           **options):
    """Raw op call: (rows, grad_student or None, grad_teacher or None)."""
    o = dict(DEFAULTS, **options)
    ce_w, div_w = weights(target is not None, o["alpha"], o["temperature"], o["scale_by_t2"])
    if inplace:
        student = gs = student.clone()
    else:
        gs = torch.full_like(student, float("nan")) if grad_student else None
    gt = torch.full_like(teacher, float("nan")) if grad_teacher else None
    rows = torch.ops.fastkd.dense_kd(student, teacher, target, gs, gt, o["temperature"], ce_w,
                                     div_w, DIVERGENCES.index(o["divergence"]), o["beta"],
                                     o["ignore_index"], o["label_smoothing"], o["softcap"] or 0.0)
    torch.cuda.synchronize()
    return rows, gs, gt


def oracle_rows(student, teacher, target, dtype=torch.float64, **options):
    """The oracle's rows and d sum(rows) / d (student, teacher) on CPU, in `dtype`."""
    s = student.detach().cpu().to(dtype).requires_grad_(True)
    t = teacher.detach().cpu().to(dtype).requires_grad_(True)
    target = None if target is None else target.cpu()
    rows = oracle_loss(s, t, target, reduction="none", dtype=dtype,
                       **dict(DEFAULTS, **options))
    gs, gt = torch.autograd.grad(rows.sum(), (s, t))
    return rows.detach(), gs, gt


def max_error(actual, expected):
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape
    assert bool(torch.isfinite(a).all()), "non-finite values (unwritten output or NaN)"
    return (a - e).abs().max().item(), e.abs().max().item()


def assert_close(actual, expected, rtol=1e-5, atol=None, what="value"):
    """max |actual - expected| <= rtol * max |expected| + atol."""
    atol = torch.finfo(torch.float32).tiny if atol is None else atol
    err, scale = max_error(actual, expected)
    assert err <= rtol * scale + atol, f"{what}: error {err:.3e} > {rtol:g} * {scale:.3e} + {atol}"


def low_precision_check(actual, exact, eager, half_ulp, what):
    """DESIGN.md §4: kernel error <= 2 * same-dtype eager error + one rounding of the max."""
    err, scale = max_error(actual, exact)
    eager_err, _ = max_error(eager, exact)
    bound = 2 * eager_err + half_ulp * scale
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e})"


def check_op(student, teacher, target, rtol=1e-5, atol=None, **kw):
    """Raw op vs oracle; float32 to rtol, bf16 / fp16 against the same-dtype eager formula."""
    rows, gs, gt = run_op(student, teacher, target, **kw)
    opts = {k: v for k, v in kw.items() if k not in ("grad_student", "grad_teacher", "inplace")}
    exact = oracle_rows(student, teacher, target, **opts)
    assert rows.dtype == torch.float32 and rows.shape == (student.shape[0],)
    got = (rows, gs, gt)
    if student.dtype != torch.float32:
        eager = oracle_rows(student, teacher, target, student.dtype, **opts)
    for i, what in enumerate(("rows", "student grad", "teacher grad")):
        if got[i] is None:
            continue
        if i > 0:
            assert got[i].dtype == student.dtype
        if student.dtype == torch.float32:
            assert_close(got[i], exact[i], rtol, atol, what)
        else:
            half_ulp = HALF_ULP[torch.float32] if i == 0 else HALF_ULP[student.dtype]
            low_precision_check(got[i], exact[i], eager[i], half_ulp, what)
    return got


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


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_low_temperature(path, divergence, beta):
    """T = 0.5: jsd / tvd gradients cancel in float32; bound by twice the eager float32 error."""
    student, teacher, target = inputs(4, 600, seed=3)
    kw = dict(divergence=divergence, beta=beta, temperature=0.5, label_smoothing=0.1)
    got = run_op(student, teacher, target, **kw)
    exact = oracle_rows(student, teacher, target, **kw)
    eager = oracle_rows(student, teacher, target, torch.float32, **kw)
    for what, k, x, e in zip(("rows", "student grad", "teacher grad"), got, exact, eager):
        err, scale = max_error(k, x)
        eager_err, _ = max_error(e, x)
        bound = max(1e-5 * scale, 2 * eager_err)
        assert err <= bound, f"{what}: error {err:.3e} > {bound:.3e} (eager {eager_err:.3e})"


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_softcap(path, divergence, beta):
    student, teacher, target = inputs(4, 700, scale=8.0, seed=4)
    check_op(student, teacher, target, divergence=divergence, beta=beta, softcap=5.0,
             label_smoothing=0.1)


@pytest.mark.parametrize("student_padded", [False, True], ids=["student-finite", "padded"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_neg_inf_columns(path, divergence, beta, student_padded):
    if divergence == "reverse_kl" and not student_padded:
        pytest.skip("KL(p_s || p_t) is +inf when the student puts mass where p_t = 0")
    student, teacher, _ = inputs(4, 1000, seed=5)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(4, 1000, generator=g) < 0.3
    mask[:, 0] = False
    mask[1, 300:] = True  # whole CTA slices of -inf
    mask = mask.cuda()
    teacher = teacher.masked_fill(mask, float("-inf"))
    if student_padded:
        student = student.masked_fill(mask, float("-inf"))
    target = torch.zeros(4, dtype=torch.int64, device="cuda")
    target[2] = -100
    _, gs, gt = check_op(student, teacher, target, divergence=divergence, beta=beta)
    assert bool((gt[mask] == 0).all()), "a -inf teacher column has zero probability"
    if student_padded:
        assert bool((gs[mask] == 0).all()), "a -inf student column has zero probability"


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_extreme_logits(path, divergence, beta):
    student, teacher, target = inputs(4, 900, scale=1e4, seed=21)
    check_op(student, teacher, target, atol=1e-5 * 0.7 * 2.0, divergence=divergence, beta=beta,
             label_smoothing=0.1)


def test_ignored_rows_and_all_ignored(path):
    student, teacher, target = inputs(6, 1000, ignore_fraction=0.5, seed=6)
    target[0], target[1] = -100, 3
    rows, gs, gt = check_op(student, teacher, target, divergence="jsd")
    ignored = target == -100
    assert bool((rows[ignored] == 0).all())
    assert bool((gs[ignored] == 0).all()) and bool((gt[ignored] == 0).all())
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
    teacher[:, 5] = float("-inf")
    rows, gs, gt = run_op(student, teacher, target, alpha=1.0, divergence="reverse_kl")
    ref_rows, ref_gs, _ = oracle_rows(student, teacher.nan_to_num(neginf=0.0), target,
                                      alpha=1.0, divergence="reverse_kl")
    assert_close(rows, ref_rows, what="rows")
    assert_close(gs, ref_gs, what="student grad")
    assert bool((gt == 0).all())
    teacher[:, 5] = 1.0
    check_op(student, teacher, target, alpha=0.0)


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
    low_precision_check(loss.detach(), exact[0], eager[0], HALF_ULP[torch.float32], "loss")
    low_precision_check(s.grad, exact[1], eager[1], HALF_ULP[torch.bfloat16], "student grad")


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
    kw = dict(temperature=2.0, alpha=0.3, divergence="jsd", label_smoothing=0.1)

    def step(s, t, y):
        return fastkd.distillation_loss(s, t, y, backend="cuda", **kw)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        s = student.clone().requires_grad_(True)
        t = teacher.clone().requires_grad_(True)
        loss = fn(s, t, target)
        loss.backward()
        results.append((loss.detach(), s.grad, t.grad))
    for what, a, b in zip(("loss", "student grad", "teacher grad"), *results):
        assert_close(a, b, rtol=1e-6, what=what)


def test_bad_inputs_name_the_argument():
    student, teacher, target = inputs(3, 10)
    opts = (2.0, 0.5, 2.0, 0, 0.5, -100, 0.0, 0.0)
    op = torch.ops.fastkd.dense_kd
    with pytest.raises(ValueError, match="teacher"):
        op(student, teacher[:, :9].contiguous(), target, None, None, *opts)
    with pytest.raises(TypeError, match="target"):
        op(student, teacher, target.int(), None, None, *opts)
    with pytest.raises(ValueError, match="grad_student"):
        op(student, teacher, target, student.t(), None, *opts)
    with pytest.raises(ValueError, match="divergence"):
        op(student, teacher, target, None, None, *opts[:3], 7, *opts[4:])
    with pytest.raises(ValueError, match="teacher"):
        op(student, teacher.cpu(), target, None, None, *opts)
