"""Shared helpers of the raw-kernel tests (Triton, C++ CPU, CUDA, CUDA maths emulation).

Every backend implements the kernel contract of fastkd/reference/dense.py:
kernel(student, teacher, target, grad_student, grad_teacher, terms, args) -> rows, `args` a
`fastkd._kernel_args.KernelArgs` (the scalars temperature, ce_weight, div_weight,
divergence, param_a, param_b, ignore_index, label_smoothing, softcap). The helpers here build
those arguments from loss options (the weights written out independently of fastkd), run a
kernel with NaN-poisoned gradient buffers and compare its rows and gradients with the float64
oracle of tests/oracle.py. Like the oracle, nothing here imports fastkd's maths (only the
plain NamedTuple of the contract), so a bug in the library cannot hide in its tests.
"""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_loss, random_logits, random_target

from fastkd._kernel_args import KernelArgs

DIVERGENCE_CASES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("tvd", 0.5)]
DIVERGENCE_IDS = ["kl", "reverse_kl", "jsd-0.5", "jsd-0.1", "tvd"]
#: The four divergences of issue 22 (name, options): run by the backends that serve them.
NEW_DIVERGENCE_CASES = [("skew_kl", dict(skew=0.1)), ("skew_kl", dict(skew=0.7)),
                        ("skew_reverse_kl", dict(skew=0.1)),
                        ("skew_reverse_kl", dict(skew=0.7)), ("akl", {}),
                        ("alpha_beta", dict(alpha_beta=(0.5, 0.5))),
                        ("alpha_beta", dict(alpha_beta=(1.5, 0.3)))]
NEW_DIVERGENCE_IDS = ["skew_kl-0.1", "skew_kl-0.7", "skew_reverse_kl-0.1",
                      "skew_reverse_kl-0.7", "akl", "alpha_beta-0.5-0.5", "alpha_beta-1.5-0.3"]
#: The kernel contract's divergence codes, by position.
DIVERGENCE_CODES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "akl",
                    "alpha_beta")
#: Per-element rounding of one value to the dtype (half an ulp at 1.0).
HALF_ULP = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12, torch.float32: 2.0**-24}
#: The contract's scalars of a valid call (KL, T = 2, alpha = 0.5, with a target).
VALID_ARGS = KernelArgs(temperature=2.0, ce_weight=0.5, div_weight=2.0, divergence=0,
                        param_a=0.0, param_b=0.0, ignore_index=-100, label_smoothing=0.0,
                        softcap=0.0)
#: The raw ops' scalar arguments (temperature .. softcap, csrc/ops.cpp) of a valid call.
VALID_SCALARS = VALID_ARGS.dense_scalars()
#: Loss options of the raw-kernel tests unless a test overrides them.
#: Loss options of the torch.compile checks.
COMPILE_OPTIONS = dict(temperature=2.0, alpha=0.3, divergence="jsd", label_smoothing=0.1)
DEFAULTS = dict(temperature=2.0, alpha=0.3, divergence="kl", beta=0.5, skew=0.1,
                alpha_beta=None, scale_by_t2=True,
                ignore_index=-100, label_smoothing=0.0, softcap=None)
#: Keyword arguments that steer how a kernel is run, not the loss: the oracle ignores them.
RUN_ONLY = ("path", "shape", "grad_student", "grad_teacher", "inplace")
OUTPUTS = ("rows", "student grad", "teacher grad")


def weights(target_given, alpha, temperature, scale_by_t2):
    """(ce_weight, div_weight) of docs/semantics.md §1, written out independently of fastkd."""
    k = temperature**2 if scale_by_t2 else 1.0
    return (0.0, k) if not target_given else (alpha, (1.0 - alpha) * k)


def scalars(target_given: bool, **options) -> KernelArgs:
    """The contract's scalars for loss `options` (DEFAULTS otherwise)."""
    o = dict(DEFAULTS, **options)
    ce_weight, div_weight = weights(target_given, o["alpha"], o["temperature"],
                                    o["scale_by_t2"])
    divergence, param_a, param_b = o["divergence"], 0.0, 0.0
    if divergence == "jsd":
        param_a = o["beta"]
    elif divergence in ("skew_kl", "skew_reverse_kl"):
        param_a = o["skew"]
    elif divergence == "alpha_beta":
        param_a, param_b = (float(x) for x in o["alpha_beta"])
        # the AB formula's limits are the KLs; the kernels see only a, b > 0
        limits = {(1.0, 0.0): "kl", (0.0, 1.0): "reverse_kl"}
        divergence = limits.get((param_a, param_b), divergence)
        if divergence != "alpha_beta":
            param_a = param_b = 0.0
    return KernelArgs(o["temperature"], ce_weight, div_weight,
                      DIVERGENCE_CODES.index(divergence), param_a, param_b,
                      o["ignore_index"], o["label_smoothing"], o["softcap"] or 0.0)


def kernel_args(student, teacher, target, gs, gt, terms=None, **options):
    """The contract's 7 positional arguments for loss `options` (DEFAULTS otherwise)."""
    return (student, teacher, target, gs, gt, terms, scalars(target is not None, **options))


def launcher(launch, terms=None, **keywords):
    """The kernel contract on a launcher that takes the op's scalars spread out
    (`launch(student, teacher, target, gs, gt, terms, temperature, ..., softcap,
    **keywords)`, e.g. `fastkd.ops.triton_dense.launch_dense_kd` with its tile sizes);
    `terms`, when given, replaces the contract's."""

    def kernel(s, t, y, gs, gt, contract_terms, args):
        buffer = contract_terms if terms is None else terms
        return launch(s, t, y, gs, gt, buffer, *args.dense_scalars(), **keywords)

    return kernel


def op_args(student, teacher, target, gs, gt, **options):
    """The raw op's positional arguments (csrc/ops.cpp, before `terms`) for `options`."""
    return (student, teacher, target, gs, gt) + scalars(target is not None,
                                                        **options).dense_scalars()


def poisoned(like):
    """A NaN-filled buffer like `like`: an element the kernel forgets to write stays NaN."""
    return torch.full_like(like, float("nan"))


def inputs(n, vocab, dtype=torch.float32, ignore_fraction=0.3, scale=3.0, seed=0, device="cpu"):
    """(student (n, vocab), teacher (n, vocab), target (n,)) on `device`: normal logits."""
    student = random_logits(n, vocab, scale=scale, dtype=dtype, seed=seed).to(device)
    teacher = random_logits(n, vocab, scale=scale, dtype=dtype, seed=seed + 1).to(device)
    target = random_target(n, vocab=vocab, ignore_fraction=ignore_fraction, seed=seed)
    return student, teacher, target.to(device)


def run_raw(kernel, student, teacher, target, *, grad_student=True, grad_teacher=True,
            inplace=False, **options):
    """(rows, grad_student or None, grad_teacher or None) of `kernel(*kernel_args(...))`.

    Gradient buffers are poisoned first; `inplace` lets grad_student alias a copy of the
    student, as the in-place backward does (otherwise the student is passed as given, so a
    strided view stays strided)."""
    if inplace:
        student = gs = student.clone()
    else:
        gs = poisoned(student) if grad_student else None
    gt = poisoned(teacher) if grad_teacher else None
    rows = kernel(*kernel_args(student, teacher, target, gs, gt, **options))
    return rows, gs, gt


def oracle_rows(student, teacher, target, dtype=torch.float64, **options):
    """The oracle's rows and d sum(rows) / d (student, teacher) on CPU, in `dtype` (float64:
    exact; lower: the eager formula whose error bounds a kernel in that dtype)."""
    options = {k: v for k, v in options.items() if k not in RUN_ONLY}
    s = student.detach().cpu().to(dtype).requires_grad_(True)
    t = teacher.detach().cpu().to(dtype).requires_grad_(True)
    target = None if target is None else target.cpu()
    rows = oracle_loss(s, t, target, reduction="none", dtype=dtype,
                       **dict(DEFAULTS, **options))
    gs, gt = torch.autograd.grad(rows.sum(), (s, t))
    return rows.detach(), gs, gt


def max_error(actual, expected, what="value"):
    """(max |actual - expected|, max |expected|) in float64; `actual` must be finite."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert bool(torch.isfinite(a).all()), f"{what}: non-finite values (unwritten output or NaN)"
    return (a - e).abs().max().item(), e.abs().max().item()


def assert_close(actual, expected, rtol=1e-5, atol=None, what="value"):
    """max |actual - expected| <= rtol * max |expected| + atol (max-norm relative error; the
    default floor is float32's smallest normal number)."""
    atol = torch.finfo(torch.float32).tiny if atol is None else atol
    err, scale = max_error(actual, expected, what)
    assert err <= rtol * scale + atol, f"{what}: error {err:.3e} > {rtol:g} * {scale:.3e} + {atol}"


def low_precision_check(actual, exact, eager, half_ulp, what):
    """docs/semantics.md §10: error <= 2 * same-dtype eager error + one rounding of the max."""
    err, scale = max_error(actual, exact, what)
    eager_err, _ = max_error(eager, exact, f"{what} (eager)")
    bound = 2 * eager_err + half_ulp * scale
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e})"


def assert_within_float32(got, exact, eager):
    """Each of (rows, grads) within 1e-5 of the exact value or, where float32 arithmetic
    itself cannot get there (cancelling sums), within twice the eager float32 error."""
    for what, k, x, e in zip(OUTPUTS, got, exact, eager):
        err, scale = max_error(k, x, what)
        eager_err, _ = max_error(e, x, f"{what} (eager)")
        bound = max(1e-5 * scale, 2 * eager_err)
        assert err <= bound, f"{what}: error {err:.3e} > {bound:.3e} (eager {eager_err:.3e})"


def check_raw_kernel(run, student, teacher, target, rtol=1e-5, atol=None, half_ulps=None,
                     **kw):
    """Raw kernel vs oracle on rows and both gradients; returns the kernel outputs.

    `run(student, teacher, target, **kw)` gives (rows, grad_student, grad_teacher). Float32
    (and, without `half_ulps`, every dtype) is held to `rtol`; with `half_ulps` (dtype ->
    rounding) bf16 / fp16 are held to low_precision_check against the same-dtype formula."""
    got = run(student, teacher, target, **kw)
    exact = oracle_rows(student, teacher, target, **kw)
    rows = got[0]
    assert rows.dtype == torch.float32 and rows.shape == (student.shape[0],)
    by_eager = half_ulps is not None and student.dtype != torch.float32
    if by_eager:
        eager = oracle_rows(student, teacher, target, student.dtype, **kw)
    for i, what in enumerate(OUTPUTS):
        if got[i] is None:
            continue
        if i > 0:
            assert got[i].dtype == student.dtype, f"{what}: dtype {got[i].dtype}"
        if by_eager:
            half_ulp = half_ulps[torch.float32] if i == 0 else half_ulps[student.dtype]
            low_precision_check(got[i], exact[i], eager[i], half_ulp, what)
        else:
            assert_close(got[i], exact[i], rtol, atol, what)
    return got


def masked_columns(n, vocab, fraction=0.3, seed=0):
    """(n, vocab) bool mask of -inf columns, different per row; column 0 (the label of the
    tests) stays free and row 1 ends in a long run of -inf (whole slices / tail vectors)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, vocab, generator=g) < fraction
    mask[:, 0] = False
    mask[1, 300:] = True
    return mask


def mask_logits(student, teacher, mask, student_padded):
    """(student, teacher) with the `mask` columns set to -inf (the student's only if padded)."""
    teacher = teacher.masked_fill(mask, float("-inf"))
    if student_padded:
        student = student.masked_fill(mask, float("-inf"))
    return student, teacher


def assert_masked_gradients_zero(gs, gt, mask, student_padded):
    """A -inf column has zero probability, so its gradient is exactly 0."""
    assert bool((gt[mask] == 0).all()), "a -inf teacher column has zero probability"
    if student_padded:
        assert bool((gs[mask] == 0).all()), "a -inf student column has zero probability"


def assert_ignored_rows_zero(rows, gs, gt, ignored):
    """Ignored rows: loss and both gradient rows exactly 0."""
    assert bool((rows[ignored] == 0).all())
    assert bool((gs[ignored] == 0).all()) and bool((gt[ignored] == 0).all())


def check_low_temperature(run, student, teacher, target, **kw):
    """T = 0.5 run through `run` and held by assert_within_float32 (jsd / tvd gradients are
    differences of O(1) row sums that cancel in float32)."""
    kw = dict(kw, temperature=0.5)
    got = run(student, teacher, target, **kw)
    exact = oracle_rows(student, teacher, target, **kw)
    eager = oracle_rows(student, teacher, target, torch.float32, **kw)
    assert_within_float32(got, exact, eager)


#: JSD at T = 0.5 on scale-3 logits (both softmaxes nearly one-hot): the eager float32
#: gradients err by up to 3.5e-3 of their max norm here, since ln(p/m) - KL(p||m) cancels at
#: the dominant column; the kernels' sums relative to ln(p/m) at each side's max stay within
#: this bound (measured: at most 5e-5 on every backend).
NEAR_ONE_HOT_JSD_RTOL = 1e-4


def check_jsd_near_one_hot(run, make_inputs, **kw):
    """JSD gradients (student and teacher) of nearly one-hot rows within
    NEAR_ONE_HOT_JSD_RTOL, over several inputs and betas; `make_inputs(n, vocab, seed=...)`
    draws them on the backend's device."""
    options = dict(kw, divergence="jsd", temperature=0.5, label_smoothing=0.1)
    for seed in (3, 5, 8):
        student, teacher, target = make_inputs(4, 600, seed=seed)
        for beta in (0.1, 0.5, 0.9):
            got = run(student, teacher, target, beta=beta, **options)
            exact = oracle_rows(student, teacher, target, beta=beta, **options)
            for what, k, x in zip(OUTPUTS[1:], got[1:], exact[1:]):
                assert_close(k, x, rtol=NEAR_ONE_HOT_JSD_RTOL,
                             what=f"{what} (seed {seed}, beta {beta})")


def check_zero_weight_terms(run, check, student, teacher, target, **kw):
    """alpha=1: the divergence (infinite: reverse KL against a -inf teacher column) has
    weight 0, so it is not evaluated and the teacher gradient is 0; alpha=0: CE has weight 0
    and the target only masks rows. `check` is the backend's check_raw_kernel wrapper."""
    teacher = teacher.clone()
    teacher[:, 5] = float("-inf")
    rows, gs, gt = run(student, teacher, target, alpha=1.0, divergence="reverse_kl", **kw)
    ref_rows, ref_gs, _ = oracle_rows(student, teacher.nan_to_num(neginf=0.0), target,
                                      alpha=1.0, divergence="reverse_kl")
    assert_close(rows, ref_rows, what="rows")
    assert_close(gs, ref_gs, what="student grad")
    assert bool((gt == 0).all())
    teacher[:, 5] = 1.0
    check(student, teacher, target, alpha=0.0, **kw)


def assert_compiled_matches_eager(loss_fn, student, teacher, target, rtol=1e-6, **kw):
    """`loss_fn(s, t, y, **kw)` eager and under torch.compile(fullgraph=True): loss and both
    gradients agree to `rtol` (the kernel is the same; only the compiled glue may round)."""

    def step(s, t, y):
        return loss_fn(s, t, y, **kw)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        s = student.clone().requires_grad_(True)
        t = teacher.clone().requires_grad_(True)
        loss = fn(s, t, target)
        loss.backward()
        results.append((loss.detach(), s.grad, t.grad))
    for what, a, b in zip(("loss", "student grad", "teacher grad"), *results):
        assert_close(a, b, rtol=rtol, what=what)


def assert_bad_inputs_name_the_argument(kernel, student, teacher, target):
    """`kernel` (on the contract's arguments) raises a ValueError / TypeError naming the bad
    argument: mismatched shapes, int32 target, a non-contiguous gradient, a bad code."""
    opts = VALID_ARGS
    with pytest.raises(ValueError, match="teacher"):
        kernel(student, teacher[:, :9].contiguous(), target, None, None, None, opts)
    with pytest.raises(TypeError, match="target"):
        kernel(student, teacher, target.int(), None, None, None, opts)
    with pytest.raises(ValueError, match="grad_student"):
        kernel(student, teacher, target, student.t(), None, None, opts)
    with pytest.raises(ValueError, match="divergence"):
        kernel(student, teacher, target, None, None, None, opts._replace(divergence=99))


def skip_infinite_reverse_kl(divergence, student_padded):
    """Skips reverse KL against -inf teacher columns the student still puts mass on."""
    if divergence == "reverse_kl" and not student_padded:
        pytest.skip("KL(p_s || p_t) is +inf when the student puts mass where p_t = 0")


def strided_rows(tensor, extra=5):
    """`tensor` (n, v) as rows of a wider buffer: same values, row stride v + extra,
    stride(1) == 1, the buffer's extra columns NaN (a kernel that reads past a row sees
    them)."""
    n, v = tensor.shape
    buffer = torch.full((n, v + extra), float("nan"), dtype=tensor.dtype, device=tensor.device)
    buffer[:, :v] = tensor
    return buffer[:, :v]


def run_raw_layout(kernel, student, teacher, target, *, terms=True, grad_teacher=True,
                   **options):
    """Like run_raw, with student, teacher and both NaN-poisoned gradient buffers as strided
    rows of wider buffers (each its own row stride) and an NaN-poisoned terms buffer.
    Returns (rows, grad_student, grad_teacher, terms), the gradients as contiguous copies."""
    s, t = strided_rows(student, 3), strided_rows(teacher, 7)
    gs = strided_rows(poisoned(student), 2)
    gt = strided_rows(poisoned(teacher), 4) if grad_teacher else None
    tm = torch.full((student.shape[0], 2), float("nan"), device=student.device) if terms \
        else None
    rows = kernel(*kernel_args(s, t, target, gs, gt, tm, **options))
    return rows, gs.contiguous(), None if gt is None else gt.contiguous(), tm


def oracle_terms(student, teacher, target, **options):
    """(ce, divergence) per row, unweighted, 0 where ignored (ce 0 without a target)."""
    o = dict(DEFAULTS, **{k: v for k, v in options.items() if k not in RUN_ONLY})
    kw = {k: o[k] for k in ("temperature", "divergence", "beta", "skew", "alpha_beta",
                            "ignore_index", "label_smoothing", "softcap")}
    s, t = student.detach().cpu().double(), teacher.detach().cpu().double()
    y = None if target is None else target.cpu()
    div = oracle_loss(s, t, y, alpha=0.0, scale_by_t2=False, reduction="none", **kw)
    if y is None:
        return torch.zeros_like(div), div
    return oracle_loss(s, t, y, alpha=1.0, reduction="none", **kw), div


def check_layout_dtypes_terms(kernel, student, teacher, target, rtol=1e-5, **options):
    """The contract's layout, dtype and terms rules on one call: strided rows everywhere,
    each side in its own dtype, each gradient written in its input's dtype, the terms
    buffer fully written and rows == ce_weight * terms[:, 0] + div_weight * terms[:, 1].
    Values are held to float32 accuracy on the same (exactly representable) inputs, plus the
    rounding of each gradient to its dtype."""
    rows, gs, gt, terms = run_raw_layout(kernel, student, teacher, target, **options)
    exact = oracle_rows(student, teacher, target, **options)
    assert rows.dtype == torch.float32 and terms.dtype == torch.float32
    assert gs.dtype == student.dtype and gt.dtype == teacher.dtype
    assert_close(rows, exact[0], rtol, what="rows")
    for what, got, ref in (("student grad", gs, exact[1]), ("teacher grad", gt, exact[2])):
        rounding = 2.0 * HALF_ULP[got.dtype] if got.dtype != torch.float32 else 0.0
        assert_close(got, ref, rtol + 4 * rounding, what=what)
    ce, div = oracle_terms(student, teacher, target, **options)
    assert_close(terms[:, 0], ce, rtol, what="terms ce")
    assert_close(terms[:, 1], div, rtol, what="terms divergence")
    o = dict(DEFAULTS, **options)
    ce_w, div_w = weights(target is not None, o["alpha"], o["temperature"], o["scale_by_t2"])
    assert_close(rows, ce_w * terms[:, 0] + div_w * terms[:, 1], 1e-6, what="rows vs terms")
    return rows, gs, gt, terms
